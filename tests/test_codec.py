"""Specification of the bundle codec: exact round trips, digests, and every refusal by name."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rumor.protocol import codec
from rumor.protocol.bundle import Bundle
from rumor.protocol.constants import ALIGNMENT, CODEC_VERSION, ENCODING_RAW_LE
from rumor.protocol.errors import Code, Rejected
from rumor.protocol.v1 import tensor_pb2

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def stream(enc: codec.EncodedBundle, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(bytes(c) for c in enc.chunks(chunk_size))


def roundtrip(bundle: Bundle, chunk_size: int = 1 << 20, **kwargs: object) -> Bundle:
    enc = codec.encode(bundle)
    dec = codec.BundleDecoder(enc.header, **kwargs)  # type: ignore[arg-type]
    for chunk in enc.chunks(chunk_size):
        dec.feed(chunk)
    return dec.finish()


def assert_same(a: Bundle, b: Bundle) -> None:
    assert list(a.tensors) == list(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert u.dtype == t.dtype, name
        assert u.shape == t.shape, name
        assert raw_bytes(u) == raw_bytes(t), name
    assert a.meta == b.meta
    for key, value in a.meta.items():
        assert type(b.meta[key]) is type(value), key


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    numel = int(np.prod(shape)) if shape else 1
    if dtype == torch.bool:
        values = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
        return torch.tensor(values, dtype=torch.bool).reshape(shape)
    size = numel * torch.empty((), dtype=dtype).element_size()
    data = draw(st.binary(min_size=size, max_size=size))
    return torch.tensor(list(data), dtype=torch.uint8).view(dtype).reshape(shape)


scalars = st.one_of(st.booleans(), INT64, st.floats(allow_nan=False), st.text(max_size=10))
bundles = st.builds(
    Bundle,
    st.dictionaries(st.text(max_size=8), tensors(), max_size=6),
    st.dictionaries(st.text(max_size=8), scalars, max_size=5),
)


def sample_bundle() -> Bundle:
    torch.manual_seed(0)
    return Bundle(
        {"w": torch.randn(3, 4), "b": torch.randn(5), "step": torch.tensor(7)},
        {"degree": 3, "lr": 0.1, "tag": "x", "warm": True},
    )


def good_header() -> tuple[tensor_pb2.BundleHeader, bytes]:
    enc = codec.encode(Bundle({"w": torch.randn(3, 4), "b": torch.randn(5)}))
    header = tensor_pb2.BundleHeader()
    header.CopyFrom(enc.header)
    return header, stream(enc)


def rejected(header: tensor_pb2.BundleHeader, **kwargs: object) -> Rejected:
    with pytest.raises(Rejected) as info:
        codec.BundleDecoder(header, **kwargs)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------------ round trips


@SETTINGS
@given(bundles, st.sampled_from([1, 7, 64, 1000, 1 << 20]))
def test_any_bundle_round_trips_bit_exactly_in_any_chunk_size(bundle: Bundle, size: int) -> None:
    out = roundtrip(bundle, size, check_finite=False)
    assert_same(bundle, out)


@SETTINGS
@given(bundles)
def test_chunks_are_bounded_and_concatenate_to_the_digested_payload(bundle: Bundle) -> None:
    enc = codec.encode(bundle)
    for size in (1, 7, 100):
        chunks = [bytes(c) for c in enc.chunks(size)]
        assert all(0 < len(c) <= size for c in chunks)
        assert all(len(c) == size for c in chunks[:-1])
        payload = b"".join(chunks)
        assert len(payload) == enc.header.total_bytes
        assert xxhash.xxh3_128(payload).digest() == enc.header.digest


@SETTINGS
@given(bundles)
def test_header_layout_is_aligned_and_names_every_tensor(bundle: Bundle) -> None:
    header = codec.encode(bundle).header
    assert header.codec_version == CODEC_VERSION
    assert header.encoding == ENCODING_RAW_LE
    assert [s.name for s in header.tensors] == list(bundle.tensors)
    end = 0
    for spec, t in zip(header.tensors, bundle.tensors.values(), strict=True):
        assert spec.offset % ALIGNMENT == 0
        assert spec.offset >= end
        assert list(spec.shape) == list(t.shape)
        assert spec.nbytes == t.numel() * t.element_size()
        end = spec.offset + spec.nbytes
    assert header.total_bytes == end


def test_finite_values_round_trip_with_the_finiteness_check_on() -> None:
    bundle = Bundle({str(d): torch.randn(17, 3).to(d) for d in DTYPES})
    assert_same(bundle, roundtrip(bundle, 100))


def test_zero_dim_and_empty_tensors_round_trip() -> None:
    bundle = Bundle(
        {
            "scalar": torch.tensor(2.5),
            "bf16_scalar": torch.tensor(-1.0, dtype=torch.bfloat16),
            "empty": torch.empty(0),
            "empty_2d": torch.empty(3, 0, dtype=torch.int16),
            "flag": torch.tensor(True),
        }
    )
    out = roundtrip(bundle, 1)
    assert_same(bundle, out)
    assert out.tensors["scalar"].shape == ()
    assert out.tensors["empty_2d"].shape == (3, 0)


def test_bundle_of_only_empty_tensors_has_an_empty_payload() -> None:
    bundle = Bundle({"e": torch.empty(0, 4), "f": torch.empty(0, dtype=torch.bfloat16)})
    enc = codec.encode(bundle)
    assert enc.header.total_bytes == 0
    assert_same(bundle, codec.decode(enc.header, b""))


def test_bundle_without_tensors_has_an_empty_payload() -> None:
    enc = codec.encode(Bundle({}, {"n": 1}))
    assert enc.header.total_bytes == 0
    assert list(enc.chunks()) == []
    dec = codec.BundleDecoder(enc.header)
    assert dec.complete
    assert dec.finish() == Bundle({}, {"n": 1})


def test_meta_keeps_the_type_of_each_scalar() -> None:
    meta = {"b": True, "f": False, "i": -(1 << 63), "x": 1.5, "s": "é", "n": np.int32(4)}
    enc = codec.encode(Bundle({}, meta))
    kinds = {k: v.WhichOneof("value") for k, v in enc.header.meta.items()}
    assert kinds == {"b": "b", "f": "b", "i": "i", "x": "f", "s": "s", "n": "i"}
    out = codec.decode(enc.header, b"").meta
    assert out == {"b": True, "f": False, "i": -(1 << 63), "x": 1.5, "s": "é", "n": 4}
    assert type(out["b"]) is bool and type(out["i"]) is int and type(out["n"]) is int


def test_meta_that_cannot_travel_is_refused_by_the_sender() -> None:
    with pytest.raises(ValueError, match="int64"):
        codec.encode(Bundle({}, {"big": 1 << 63}))
    with pytest.raises(TypeError, match="'obj'"):
        codec.encode(Bundle({}, {"obj": [1]}))  # type: ignore[dict-item]


def test_non_contiguous_and_grad_tensors_are_sent_as_their_values() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    param = torch.nn.Parameter(torch.randn(3, 3))
    bundle = Bundle(
        {
            "transposed": base.t(),
            "strided": base[:, ::2],
            "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
            "slice": base.reshape(-1)[5:11],
            "param": param,
            "neg": torch.randn(4)._neg_view(),
        }
    )
    out = roundtrip(bundle, 5)
    for name, t in bundle.tensors.items():
        assert torch.equal(out.tensors[name], t.detach()), name
        assert out.tensors[name].is_contiguous()


def test_unsupported_tensors_are_refused_by_the_sender() -> None:
    with pytest.raises(TypeError, match="complex64"):
        codec.encode(Bundle({"c": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(TypeError, match="layout"):
        codec.encode(Bundle({"s": torch.eye(3).to_sparse()}))


def test_decoded_tensors_are_views_into_one_landing_buffer() -> None:
    out = roundtrip(sample_bundle(), 7)
    pointers = {t.untyped_storage().data_ptr() for t in out.tensors.values()}
    assert len(pointers) == 1


def test_decoded_tensors_are_writable_and_independent_of_the_sender() -> None:
    bundle = sample_bundle()
    before = bundle.tensors["w"].clone()
    out = roundtrip(bundle)
    out.tensors["w"].add_(1.0)
    assert torch.equal(bundle.tensors["w"], before)
    bundle.tensors["b"].zero_()
    assert out.tensors["b"].abs().sum() > 0


def test_in_tensor_chunks_are_zero_copy_views() -> None:
    enc = codec.encode(Bundle({"big": torch.zeros(1000)}))
    chunks = list(enc.chunks(1000))
    assert all(isinstance(c, memoryview) for c in chunks)
    assert len(chunks) == 4


def test_chunk_size_bigger_than_the_payload_gives_one_chunk() -> None:
    enc = codec.encode(sample_bundle())
    chunks = list(enc.chunks(10 * enc.header.total_bytes))
    assert len(chunks) == 1
    assert len(chunks[0]) == enc.header.total_bytes


def test_padding_is_zero_on_the_wire() -> None:
    enc = codec.encode(Bundle({"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(1)}))
    payload = stream(enc, 7)
    assert payload[3:ALIGNMENT] == bytes(ALIGNMENT - 3)


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        list(codec.encode(sample_bundle()).chunks(0))


# ----------------------------------------------------------------------------- digests


def test_wire_digest_is_stable_and_changes_with_any_byte() -> None:
    bundle = sample_bundle()
    first = codec.encode(bundle).header.digest
    assert codec.encode(bundle).header.digest == first
    bundle.tensors["w"][1, 2] += 1.0
    assert codec.encode(bundle).header.digest != first


def test_bundle_digest_identifies_equal_models() -> None:
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    b = {"b": torch.zeros(2), "w": torch.arange(6.0).reshape(2, 3).clone()}
    digest = codec.bundle_digest(a)
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert codec.bundle_digest(b) == digest
    assert codec.bundle_digest(Bundle(b)) == digest
    assert codec.bundle_digest({"w": a["w"].t().contiguous().t(), "b": a["b"]}) == digest


@pytest.mark.parametrize(
    "other",
    [
        {"w": torch.arange(6.0).reshape(3, 2), "b": torch.zeros(2)},  # shape
        {"w": torch.arange(6.0).reshape(2, 3).view(torch.int32), "b": torch.zeros(2)},  # dtype
        {"v": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)},  # name
        {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([0.0, 1e-30])},  # value
        {"w": torch.arange(6.0).reshape(2, 3)},  # missing tensor
    ],
)
def test_bundle_digest_changes_with_name_dtype_shape_and_value(
    other: dict[str, torch.Tensor],
) -> None:
    base = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    assert codec.bundle_digest(other) != codec.bundle_digest(base)


# -------------------------------------------------------------------------- snapshots


def test_snapshot_sends_the_state_at_encode_time() -> None:
    bundle = sample_bundle()
    sent = {k: v.clone() for k, v in bundle.tensors.items()}
    enc = codec.encode(bundle, snapshot=True)
    for t in bundle.tensors.values():
        t.add_(1)
    dec = codec.BundleDecoder(enc.header)
    for chunk in enc.chunks(9):
        dec.feed(chunk)
    out = dec.finish()
    for name, t in sent.items():
        assert torch.equal(out.tensors[name], t)


@SETTINGS
@given(bundles)
def test_snapshot_payload_equals_the_zero_copy_payload(bundle: Bundle) -> None:
    plain, snap = codec.encode(bundle), codec.encode(bundle, snapshot=True)
    assert plain.header == snap.header
    assert stream(plain, 3) == stream(snap, 3)


def test_snapshot_copies_strided_tensors_directly() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    bundle = Bundle(
        {
            "u8": torch.ones(3, dtype=torch.uint8),
            "transposed": base.t(),
            "expanded": torch.tensor([True, False]).expand(3, 2),
            "neg": torch.randn(5)._neg_view(),
            "scalar": torch.tensor(3, dtype=torch.int16),
        }
    )
    plain, snap = codec.encode(bundle), codec.encode(bundle, snapshot=True)
    assert plain.header == snap.header
    assert stream(plain, 5) == stream(snap, 5)


def test_mutating_a_tensor_while_streaming_without_snapshot_is_caught_as_data_loss() -> None:
    bundle = sample_bundle()
    enc = codec.encode(bundle)
    bundle.tensors["w"].add_(1)
    with pytest.raises(Rejected) as info:
        codec.decode(enc.header, stream(enc))
    assert info.value.code == Code.DATA_LOSS


# ------------------------------------------------------------------------- rejections


def test_unknown_codec_version_is_a_failed_precondition() -> None:
    header, _ = good_header()
    header.codec_version = CODEC_VERSION + 1
    err = rejected(header)
    assert err.code == Code.FAILED_PRECONDITION
    assert f"codec version {CODEC_VERSION + 1}" in err.detail


@pytest.mark.parametrize("encoding", ["", "zstd"])
def test_unknown_encoding_is_refused(encoding: str) -> None:
    header, _ = good_header()
    header.encoding = encoding
    err = rejected(header)
    assert err.code == Code.INVALID_ARGUMENT
    assert f"unknown encoding {encoding!r}" in err.detail


@pytest.mark.parametrize(("value", "label"), [(0, "DTYPE_UNSPECIFIED"), (99, "99")])
def test_unknown_dtype_is_refused(value: int, label: str) -> None:
    header, _ = good_header()
    header.tensors[0].dtype = value  # type: ignore[assignment]
    err = rejected(header)
    assert err.code == Code.INVALID_ARGUMENT
    assert "tensor 'w'" in err.detail and f"unknown dtype {label}" in err.detail


def test_too_many_tensors_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_TENSORS", 1)
    header, _ = good_header()
    err = rejected(header)
    assert err.code == Code.INVALID_ARGUMENT
    assert "too many tensors: 2" in err.detail


def test_too_many_dims_is_refused() -> None:
    header = codec.encode(Bundle({"deep": torch.zeros([1] * 33)})).header
    err = rejected(header)
    assert "tensor 'deep'" in err.detail and "too many dims: 33" in err.detail


def test_negative_dim_is_refused() -> None:
    header, _ = good_header()
    header.tensors[1].shape[0] = -5
    err = rejected(header)
    assert err.code == Code.INVALID_ARGUMENT
    assert "tensor 'b': negative dim in shape [-5]" in err.detail


def test_shape_and_byte_count_that_disagree_are_refused() -> None:
    header, _ = good_header()
    header.tensors[0].nbytes = 40
    err = rejected(header)
    assert err.detail == "tensor 'w': shape [3, 4] of float32 needs 48 bytes, header says 40"


def test_misaligned_offset_is_refused() -> None:
    header, _ = good_header()
    header.tensors[1].offset = 65
    assert "tensor 'b': offset 65 is misaligned" in rejected(header).detail


def test_overlapping_tensors_are_refused() -> None:
    header, _ = good_header()
    header.tensors[1].offset = 0
    assert "tensors 'w' and 'b' overlap" in rejected(header).detail


def test_out_of_range_offset_is_refused() -> None:
    header, _ = good_header()
    header.tensors[1].offset = 128
    err = rejected(header)
    assert "tensor 'b': bytes [128, 148) are out of range" in err.detail


def test_total_bytes_beyond_the_layout_is_refused() -> None:
    header, _ = good_header()
    header.total_bytes += ALIGNMENT
    assert "does not match the layout" in rejected(header).detail


def test_duplicate_names_are_refused() -> None:
    header, _ = good_header()
    header.tensors[1].name = "w"
    assert "duplicate tensor name 'w'" in rejected(header).detail


def test_bundle_over_the_size_limit_is_resource_exhausted() -> None:
    header, _ = good_header()
    err = rejected(header, max_bytes=10)
    assert err.code == Code.RESOURCE_EXHAUSTED
    assert err.detail == f"bundle of {header.total_bytes} bytes exceeds the limit of 10"


def test_digest_of_wrong_length_is_refused() -> None:
    header, _ = good_header()
    header.digest = b"\x01" * 8
    assert "digest of 8 bytes" in rejected(header).detail


def test_meta_without_value_is_refused() -> None:
    header, _ = good_header()
    header.meta["empty"].CopyFrom(tensor_pb2.Scalar())
    assert "meta 'empty' has no value" in rejected(header).detail


def test_huge_names_are_shortened_in_messages() -> None:
    header, _ = good_header()
    header.tensors[0].dtype = 0  # type: ignore[assignment]
    header.tensors[0].name = "x" * 100_000
    assert len(rejected(header).detail) < 400


def test_more_bytes_than_announced_are_refused_as_oversize() -> None:
    header, payload = good_header()
    dec = codec.BundleDecoder(header)
    dec.feed(payload)
    with pytest.raises(Rejected) as info:
        dec.feed(b"x")
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.detail.startswith("oversize:")


def test_truncated_payload_is_refused() -> None:
    header, payload = good_header()
    dec = codec.BundleDecoder(header)
    dec.feed(payload[:-1])
    with pytest.raises(Rejected) as info:
        dec.finish()
    assert info.value.detail == f"truncated: got {len(payload) - 1} of {len(payload)} bytes"


@pytest.mark.parametrize("where", [0, 50])  # a tensor byte, and a padding byte
def test_a_changed_byte_is_a_digest_mismatch(where: int) -> None:
    header, payload = good_header()
    corrupt = bytearray(payload)
    corrupt[where] ^= 0x40
    with pytest.raises(Rejected) as info:
        codec.decode(header, corrupt)
    assert info.value.code == Code.DATA_LOSS
    assert "digest mismatch" in info.value.detail


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_unless_allowed(dtype: torch.dtype, bad: float) -> None:
    w = torch.randn(4, 5).to(dtype)
    w[2, 3] = bad
    enc = codec.encode(Bundle({"ok": torch.randn(3).to(dtype), "w": w}))
    with pytest.raises(Rejected) as info:
        codec.decode(enc.header, stream(enc))
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.detail == "tensor 'w' has non-finite values"
    out = codec.decode(enc.header, stream(enc), check_finite=False)
    assert raw_bytes(out.tensors["w"]) == raw_bytes(w)


def test_large_finite_values_whose_sum_overflows_are_accepted() -> None:
    big = torch.full((8,), 60000.0, dtype=torch.float16)
    out = roundtrip(Bundle({"big": big}))
    assert torch.equal(out.tensors["big"], big)


def test_big_endian_hosts_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    header, _ = good_header()
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(NotImplementedError, match="little-endian"):
        codec.encode(sample_bundle())
    with pytest.raises(NotImplementedError, match="little-endian"):
        codec.BundleDecoder(header)


def test_a_deferred_digest_is_required_after_the_payload_and_checked() -> None:
    bundle = sample_bundle()
    enc = codec.encode(bundle, defer_digest=True)
    assert enc.header.digest == b""
    payload = stream(enc)
    digest = xxhash.xxh3_128(payload).digest()
    assert digest == codec.encode(bundle).header.digest  # the same digest, taken later
    assert_same(bundle, codec.decode(enc.header, payload, digest=digest))
    cases = [
        (None, Code.INVALID_ARGUMENT, "no digest: the header has none"),
        (digest[:8], Code.INVALID_ARGUMENT, "digest of 8 bytes after the payload"),
        (bytes(16), Code.DATA_LOSS, "digest mismatch: payload hashes to"),
    ]
    for given_digest, code, problem in cases:
        with pytest.raises(Rejected) as info:
            codec.decode(enc.header, payload, digest=given_digest)
        assert info.value.code == code and problem in info.value.detail


def test_a_header_digest_leaves_no_room_for_a_second_one() -> None:
    enc = codec.encode(sample_bundle())
    with pytest.raises(Rejected) as info:
        codec.decode(enc.header, stream(enc), digest=enc.header.digest)
    assert "a second digest" in info.value.detail


def test_an_empty_payload_keeps_its_digest_in_the_header_even_when_deferred() -> None:
    enc = codec.encode(Bundle({"e": torch.zeros(0)}, {"n": 1}), defer_digest=True)
    assert enc.header.digest == xxhash.xxh3_128(b"").digest()
    assert codec.decode(enc.header, b"").meta == {"n": 1}
