"""The KV connector: the send half on prefill workers, the landing half on decode workers."""

from diptych.engine.kv_connector.land import KVLandingHalf
from diptych.engine.kv_connector.send import KVSendHalf, KVShape, join_sender
from diptych.engine.kv_transfer import KVStreamReceiver

__all__ = ["KVLandingHalf", "KVSendHalf", "KVShape", "KVStreamReceiver", "join_sender"]
