/* y[m, n] = sum_k x[m, k] * w[n, k] with w kept in GGUF's block-quantized form, x and y fp32.

   Rows of w are split into blocks of 32 along k. Block b of row n holds a scale d[n, b], an optional
   offset o[n, b] (NULL: none) and 32 codes q, and its weights are d * q + o (4-bit codes, q in 0..15:
   Q4_1 directly, Q4_0 with o = -8 d) or d * q (8-bit signed codes: Q8_0). The scale and offset are fp16
   in the file and fp32 here, so each weight is computed exactly as gguf-py's dequantize computes it: the
   product d * q is exact in fp32 and the one rounding is the add, the same one FMA makes.

   4-bit codes are packed as in GGUF: byte j of a block holds code j in its low nibble, code j + 16 in its
   high nibble. Only the weights' order of summation differs from a dense fp32 product.

   Work is split over tiles of weight rows (OpenMP; the library is linked against the libgomp torch has
   already loaded, so both share one thread pool). Within a tile, activation rows go eight at a time:
   each weight block is decoded once per eight rows, and the tile's codes stay in L1 across the passes.
   A pass takes four weight rows (up to four activation rows) or two (more), so that each activation
   vector loaded feeds several FMAs. */

#include <stdint.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define BLOCK 32
#define ROWS_PER_PASS 8
#define TILE_ROWS 16

#ifdef __AVX512F__

/* The 32 weights of one block as two vectors (weights 0-15, 16-31). */
static inline __attribute__((always_inline)) void decode_q4(
    const uint8_t *codes, float scale, const float *offset, __m512 *lo, __m512 *hi)
{
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i packed = _mm_loadu_si128((const __m128i *)codes);
    const __m512 q_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, nibble)));
    const __m512 q_hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble)));
    const __m512 d = _mm512_set1_ps(scale);
    if (offset) {
        const __m512 o = _mm512_set1_ps(*offset);
        *lo = _mm512_fmadd_ps(d, q_lo, o);
        *hi = _mm512_fmadd_ps(d, q_hi, o);
    } else {
        *lo = _mm512_mul_ps(d, q_lo);
        *hi = _mm512_mul_ps(d, q_hi);
    }
}

static inline __attribute__((always_inline)) void decode_q8(
    const uint8_t *codes, float scale, __m512 *lo, __m512 *hi)
{
    const __m512 d = _mm512_set1_ps(scale);
    const __m512i q_lo = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes));
    const __m512i q_hi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16)));
    *lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(q_lo));
    *hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(q_hi));
}

/* `wrows` weight rows against `rows` activation rows, both compile-time constants after inlining, so the
   wrows x rows accumulators live in registers. Each activation vector loaded feeds wrows FMAs and each
   decoded weight vector feeds rows FMAs: with one weight row the loads of x, not the FMAs, set the pace. */
static inline __attribute__((always_inline)) void tile_pass(
    const float *x, int64_t ldx, const int wrows, const int rows, int64_t blocks, int bits,
    const uint8_t *codes, int64_t row_bytes, const float *scales, const float *offsets, float *y, int64_t ldy)
{
    __m512 acc[4][ROWS_PER_PASS];
    for (int w = 0; w < wrows; w++)
        for (int r = 0; r < rows; r++)
            acc[w][r] = _mm512_setzero_ps();
    const int64_t code_bytes = bits == 4 ? BLOCK / 2 : BLOCK;
    for (int64_t b = 0; b < blocks; b++) {
        __m512 w_lo[4], w_hi[4];
        for (int w = 0; w < wrows; w++) {
            const uint8_t *c = codes + w * row_bytes + b * code_bytes;
            const float d = scales[w * blocks + b];
            if (bits == 4)
                decode_q4(c, d, offsets ? offsets + w * blocks + b : 0, &w_lo[w], &w_hi[w]);
            else
                decode_q8(c, d, &w_lo[w], &w_hi[w]);
        }
        const float *xb = x + b * BLOCK;
        for (int r = 0; r < rows; r++) {
            const __m512 x_lo = _mm512_loadu_ps(xb + r * ldx);
            const __m512 x_hi = _mm512_loadu_ps(xb + r * ldx + 16);
            for (int w = 0; w < wrows; w++) {
                acc[w][r] = _mm512_fmadd_ps(w_lo[w], x_lo, acc[w][r]);
                acc[w][r] = _mm512_fmadd_ps(w_hi[w], x_hi, acc[w][r]);
            }
        }
    }
    for (int w = 0; w < wrows; w++)
        for (int r = 0; r < rows; r++)
            y[r * ldy + w] = _mm512_reduce_add_ps(acc[w][r]);
}

/* Four weight rows at a time for up to four activation rows, two for more; 16 accumulators either way. */
#define PASS(wr, n)                                                                                \
    case n:                                                                                        \
        tile_pass(x, ldx, wr, n, blocks, bits, codes, row_bytes, scales, offsets, y, ldy);         \
        break;

static void rows_pass(const float *x, int64_t ldx, int wrows, int rows, int64_t blocks, int bits,
                      const uint8_t *codes, int64_t row_bytes, const float *scales, const float *offsets,
                      float *y, int64_t ldy)
{
    if (wrows == 4) {
        switch (rows) { PASS(4, 1) PASS(4, 2) PASS(4, 3) PASS(4, 4) }
    } else if (wrows == 2) {
        switch (rows) { PASS(2, 1) PASS(2, 2) PASS(2, 3) PASS(2, 4) PASS(2, 5) PASS(2, 6) PASS(2, 7) PASS(2, 8) }
    } else {
        switch (rows) { PASS(1, 1) PASS(1, 2) PASS(1, 3) PASS(1, 4) PASS(1, 5) PASS(1, 6) PASS(1, 7) PASS(1, 8) }
    }
}

#else /* portable C: the same arithmetic one weight at a time */

static void row_pass(const float *x, int64_t ldx, int rows, int64_t blocks, int bits, const uint8_t *codes,
                     const float *scales, const float *offsets, float *y, int64_t ldy)
{
    float acc[ROWS_PER_PASS] = {0};
    const int64_t code_bytes = bits == 4 ? BLOCK / 2 : BLOCK;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *c = codes + b * code_bytes;
        for (int j = 0; j < BLOCK; j++) {
            float w;
            if (bits == 4) {
                const int q = j < 16 ? (c[j] & 0x0F) : (c[j - 16] >> 4);
                w = offsets ? __builtin_fmaf(scales[b], (float)q, offsets[b]) : scales[b] * (float)q;
            } else {
                w = scales[b] * (float)(int8_t)c[j];
            }
            for (int r = 0; r < rows; r++)
                acc[r] += w * x[r * ldx + b * BLOCK + j];
        }
    }
    for (int r = 0; r < rows; r++)
        y[r * ldy] = acc[r];
}

static void rows_pass(const float *x, int64_t ldx, int wrows, int rows, int64_t blocks, int bits,
                      const uint8_t *codes, int64_t row_bytes, const float *scales, const float *offsets,
                      float *y, int64_t ldy)
{
    for (int w = 0; w < wrows; w++)
        row_pass(x, ldx, rows, blocks, bits, codes + w * row_bytes, scales + w * blocks,
                 offsets ? offsets + w * blocks : 0, y + w, ldy);
}

#endif

/* x [m, k] (row stride ldx), codes [n, k / 32, 16 or 32], scales and offsets [n, k / 32], y [m, n]. */
void quantized_linear(const float *x, int64_t m, int64_t ldx, int64_t n, int64_t k, int bits,
                      const uint8_t *codes, const float *scales, const float *offsets, float *y,
                      int threads)
{
    const int64_t blocks = k / BLOCK;
    const int64_t row_bytes = blocks * (bits == 4 ? BLOCK / 2 : BLOCK);
    const int64_t tiles = (n + TILE_ROWS - 1) / TILE_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t first = tile * TILE_ROWS;
        const int64_t last = first + TILE_ROWS < n ? first + TILE_ROWS : n;
        for (int64_t m0 = 0; m0 < m; m0 += ROWS_PER_PASS) {
            const int rows = m - m0 < ROWS_PER_PASS ? (int)(m - m0) : ROWS_PER_PASS;
            const int step = rows <= 4 ? 4 : 2;
            for (int64_t row = first; row < last;) {
                const int wrows = last - row >= step ? step : (last - row >= 2 ? 2 : 1);
                rows_pass(x + m0 * ldx, ldx, wrows, rows, blocks, bits, codes + row * row_bytes, row_bytes,
                          scales + row * blocks, offsets ? offsets + row * blocks : 0, y + m0 * n + row, n);
                row += wrows;
            }
        }
    }
}
