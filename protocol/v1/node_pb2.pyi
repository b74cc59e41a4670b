from google.protobuf import any_pb2 as _any_pb2
from rumor.protocol.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("protocol_version", "sender", "kind", "round", "time", "exchange_id", "bundle", "payload", "algorithm")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    sender: str
    kind: str
    round: int
    time: float
    exchange_id: str
    bundle: _tensor_pb2.BundleHeader
    payload: _any_pb2.Any
    algorithm: str
    def __init__(self, protocol_version: _Optional[int] = ..., sender: _Optional[str] = ..., kind: _Optional[str] = ..., round: _Optional[int] = ..., time: _Optional[float] = ..., exchange_id: _Optional[str] = ..., bundle: _Optional[_Union[_tensor_pb2.BundleHeader, _Mapping]] = ..., payload: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., algorithm: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("envelope", "chunk", "digest")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    chunk: bytes
    digest: bytes
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., chunk: _Optional[bytes] = ..., digest: _Optional[bytes] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("sender", "address", "protocol_version", "round", "degree", "leaving", "finished")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    sender: str
    address: str
    protocol_version: int
    round: int
    degree: int
    leaving: bool
    finished: bool
    def __init__(self, sender: _Optional[str] = ..., address: _Optional[str] = ..., protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., degree: _Optional[int] = ..., leaving: _Optional[bool] = ..., finished: _Optional[bool] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("node_id", "protocol_version", "round", "degree", "alive", "leaving", "finished")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    protocol_version: int
    round: int
    degree: int
    alive: _containers.RepeatedScalarFieldContainer[str]
    leaving: bool
    finished: bool
    def __init__(self, node_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., degree: _Optional[int] = ..., alive: _Optional[_Iterable[str]] = ..., leaving: _Optional[bool] = ..., finished: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "algorithm", "round", "uptime_s", "loss", "accuracy", "bytes_in", "bytes_out", "exchanges", "model_digest", "peers", "rejected", "address", "finished", "since_round_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SINCE_ROUND_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    algorithm: str
    round: int
    uptime_s: float
    loss: float
    accuracy: float
    bytes_in: int
    bytes_out: int
    exchanges: int
    model_digest: str
    peers: _containers.RepeatedCompositeFieldContainer[PeerState]
    rejected: int
    address: str
    finished: bool
    since_round_s: float
    def __init__(self, node_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., round: _Optional[int] = ..., uptime_s: _Optional[float] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., exchanges: _Optional[int] = ..., model_digest: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[PeerState, _Mapping]]] = ..., rejected: _Optional[int] = ..., address: _Optional[str] = ..., finished: _Optional[bool] = ..., since_round_s: _Optional[float] = ...) -> None: ...

class PeerState(_message.Message):
    __slots__ = ("node_id", "address", "alive", "last_seen_s", "failures")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    alive: bool
    last_seen_s: float
    failures: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., alive: _Optional[bool] = ..., last_seen_s: _Optional[float] = ..., failures: _Optional[int] = ...) -> None: ...
