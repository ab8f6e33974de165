/* Paged decode attention on the CPU: one query token per sequence, fp32, reading K/V straight from the
   paged cache through the block table (no gathered copy), GQA-aware, returning the output and the
   log-sum-exp per head like the Triton kernel.

   q [B, Hq, D]; k_cache, v_cache [blocks, block_size, Hk, D]; kv_lens [B]; block_tables [B, table_stride];
   out [B, Hq, D]; lse [B, Hq]. A row with no cached token gets out 0 and lse -inf.

   One task per (sequence, KV head): each K and V row is loaded once for the heads of its query group, and
   an online softmax keeps a running max, sum and output per head, so no score buffer is needed. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define CHUNK 16 /* keys scored before their softmax weights are taken: one rescale per chunk, not per key */

static inline float dot(const float *a, const float *b, int64_t n)
{
#ifdef __AVX512F__
    if (n % 16 == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
        for (int64_t i = 16; i < n; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* o = o * alpha + p * v */
static inline void scale_add(float *o, float alpha, float p, const float *v, int64_t n)
{
#ifdef __AVX512F__
    if (n % 16 == 0) {
        const __m512 a = _mm512_set1_ps(alpha), w = _mm512_set1_ps(p);
        for (int64_t i = 0; i < n; i += 16)
            _mm512_storeu_ps(o + i, _mm512_fmadd_ps(w, _mm512_loadu_ps(v + i), _mm512_mul_ps(a, _mm512_loadu_ps(o + i))));
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++)
        o[i] = o[i] * alpha + p * v[i];
}

void paged_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int32_t *kv_lens,
                            const int32_t *block_tables, int64_t table_stride, int64_t batch, int64_t q_heads,
                            int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale, float *out,
                            float *lse, int threads)
{
    const int64_t group = q_heads / kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < batch * kv_heads; task++) {
        const int64_t b = task / kv_heads, h = task % kv_heads;
        const int64_t len = kv_lens[b];
        const float *qg = q + (b * q_heads + h * group) * head_dim;
        float *og = out + (b * q_heads + h * group) * head_dim;
        float *lg = lse + b * q_heads + h * group;
        float max[group], sum[group];
        for (int64_t g = 0; g < group; g++) {
            max[g] = -INFINITY;
            sum[g] = 0.0f;
        }
        memset(og, 0, sizeof(float) * group * head_dim);
        for (int64_t t0 = 0; t0 < len; t0 += CHUNK) {
            const int64_t n = len - t0 < CHUNK ? len - t0 : CHUNK;
            const float *k[CHUNK], *v[CHUNK];
            for (int64_t i = 0; i < n; i++) {
                const int64_t t = t0 + i;
                const int64_t slot = (int64_t)block_tables[b * table_stride + t / block_size] * block_size + t % block_size;
                k[i] = k_cache + (slot * kv_heads + h) * head_dim;
                v[i] = v_cache + (slot * kv_heads + h) * head_dim;
            }
            for (int64_t g = 0; g < group; g++) {
                float s[CHUNK], chunk_max = -INFINITY;
                for (int64_t i = 0; i < n; i++) {
                    s[i] = scale * dot(qg + g * head_dim, k[i], head_dim);
                    chunk_max = s[i] > chunk_max ? s[i] : chunk_max;
                }
                float *o = og + g * head_dim;
                float alpha = 1.0f;
                if (chunk_max > max[g]) { /* a new max: what is summed so far shrinks by exp(old - new) */
                    alpha = expf(max[g] - chunk_max);
                    sum[g] *= alpha;
                    max[g] = chunk_max;
                }
                for (int64_t i = 0; i < n; i++) {
                    const float p = expf(s[i] - max[g]);
                    sum[g] += p;
                    scale_add(o, i == 0 ? alpha : 1.0f, p, v[i], head_dim);
                }
            }
        }
        for (int64_t g = 0; g < group; g++) {
            if (len == 0) {
                lg[g] = -INFINITY;
                continue;
            }
            const float inv = 1.0f / sum[g];
            for (int64_t i = 0; i < head_dim; i++)
                og[g * head_dim + i] *= inv;
            lg[g] = max[g] + logf(sum[g]);
        }
    }
}
