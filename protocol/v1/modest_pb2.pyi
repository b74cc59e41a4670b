from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModestChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEST_CHANGE_JOIN: _ClassVar[ModestChange]
    MODEST_CHANGE_LEAVE: _ClassVar[ModestChange]

class ModestModelType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEST_MODEL_TRAINED: _ClassVar[ModestModelType]
    MODEST_MODEL_AGGREGATED: _ClassVar[ModestModelType]
MODEST_CHANGE_JOIN: ModestChange
MODEST_CHANGE_LEAVE: ModestChange
MODEST_MODEL_TRAINED: ModestModelType
MODEST_MODEL_AGGREGATED: ModestModelType

class ModestViewEntry(_message.Message):
    __slots__ = ("node_id", "address", "last_active", "index", "change", "suspected")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    SUSPECTED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    last_active: int
    index: int
    change: ModestChange
    suspected: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., last_active: _Optional[int] = ..., index: _Optional[int] = ..., change: _Optional[_Union[ModestChange, str]] = ..., suspected: _Optional[int] = ...) -> None: ...

class ModestView(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ModestViewEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[ModestViewEntry, _Mapping]]] = ...) -> None: ...

class ModestTransfer(_message.Message):
    __slots__ = ("type", "index", "round_estimate", "view", "participants")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    type: ModestModelType
    index: int
    round_estimate: int
    view: ModestView
    participants: int
    def __init__(self, type: _Optional[_Union[ModestModelType, str]] = ..., index: _Optional[int] = ..., round_estimate: _Optional[int] = ..., view: _Optional[_Union[ModestView, _Mapping]] = ..., participants: _Optional[int] = ...) -> None: ...

class ModestPing(_message.Message):
    __slots__ = ("round_estimate", "index", "address")
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    round_estimate: int
    index: int
    address: str
    def __init__(self, round_estimate: _Optional[int] = ..., index: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class ModestPong(_message.Message):
    __slots__ = ("round_estimate", "index")
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    round_estimate: int
    index: int
    def __init__(self, round_estimate: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class ModestAdvert(_message.Message):
    __slots__ = ("round_estimate", "index", "change", "address")
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    round_estimate: int
    index: int
    change: ModestChange
    address: str
    def __init__(self, round_estimate: _Optional[int] = ..., index: _Optional[int] = ..., change: _Optional[_Union[ModestChange, str]] = ..., address: _Optional[str] = ...) -> None: ...

class ModestAggAck(_message.Message):
    __slots__ = ("index", "success")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    index: int
    success: bool
    def __init__(self, index: _Optional[int] = ..., success: _Optional[bool] = ...) -> None: ...
