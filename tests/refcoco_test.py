"""The refs pickle -> JSON conversion: plain data passes, anything executable is refused."""

import json
import os
import pickle

import pytest

from flowseg_jax.data import refcoco

REFS = [
  {
    "ref_id": 0,
    "ann_id": 1719310,
    "image_id": 581857,
    "category_id": 1,
    "split": "train",
    "file_name": "COCO_train2014_000000581857_16.jpg",
    "sent_ids": (0, 1),
    "sentences": [
      {
        "sent_id": 0,
        "sent": "the lady with the blue shirt",
        "raw": "THE LADY with the blue shirt",
        "tokens": ["the", "lady", "with", "the", "blue", "shirt"],
      },  # fmt: skip
      {"sent_id": 1, "sent": "café woman", "raw": "café woman", "tokens": ["café", "woman"]},
    ],
  },
  {"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "testA", "sentences": [], "score": 0.5},
]


def _expected():
  out = json.loads(json.dumps(REFS))  # tuples become lists
  return out


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_plain_refs_convert_to_json(tmp_path, protocol):
  src = tmp_path / "refs(unc).p"
  src.write_bytes(pickle.dumps(REFS, protocol=protocol))
  out = tmp_path / "refs_unc.json"
  assert refcoco.convert_refs(src, out) == 2
  assert refcoco.load_refs_json(out) == _expected()


def _py2_str(b: bytes) -> bytes:
  return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING: how Python 2 pickles a str


def test_python2_byte_strings_are_decoded(tmp_path):
  # What Python 2 writes (protocol 2): keys and values as byte strings, UTF-8 text inside.
  # [{'ref_id': 5, 'ann_id': 6, 'image_id': 7, 'split': 'val', 'sentences': [{'sent': 'café'}]}]
  s = _py2_str
  sentence = b"](}(" + s(b"sent") + s("caf\u00e9".encode()) + b"ue"
  ref = b"}(" + s(b"ref_id") + b"K\x05" + s(b"ann_id") + b"K\x06" + s(b"image_id") + b"K\x07"
  ref += s(b"split") + s(b"val") + s(b"sentences") + sentence + b"u"
  src = tmp_path / "r.p"
  src.write_bytes(b"\x80\x02](" + ref + b"e.")
  assert refcoco.load_refs_pickle(src) == [
    {"ref_id": 5, "ann_id": 6, "image_id": 7, "split": "val", "sentences": [{"sent": "café"}]}
  ]


class _Exploit:
  def __reduce__(self):
    return (os.system, ("touch /tmp/flowseg_refcoco_pwned",))


def test_malicious_pickles_are_refused_without_running_anything(tmp_path):
  marker = "/tmp/flowseg_refcoco_pwned"
  if os.path.exists(marker):
    os.remove(marker)
  payloads = {
    "reduce": pickle.dumps([{"ref_id": _Exploit()}], protocol=2),
    "reduce_p0": pickle.dumps(_Exploit(), protocol=0),
    "object": pickle.dumps([pytest.approx(1)], protocol=4),
    "set": pickle.dumps([{1, 2}], protocol=4),
  }
  for name, data in payloads.items():
    src = tmp_path / f"{name}.p"
    src.write_bytes(data)
    with pytest.raises(refcoco.UnsafePickleError, match="refused|not plain data") as e:
      refcoco.load_refs_pickle(src)
    assert str(src) in str(e.value)
  assert not os.path.exists(marker)
  # The unpickler alone (without the opcode scan) refuses globals too.
  with pytest.raises(refcoco.UnsafePickleError, match="posix.system|os.system"):
    import io

    refcoco.SafeUnpickler(io.BytesIO(payloads["reduce"])).load()
  assert not os.path.exists(marker)


def test_not_refs_and_garbage(tmp_path):
  src = tmp_path / "x.p"
  src.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(refcoco.UnsafePickleError, match="expected a list of refs"):
    refcoco.load_refs_pickle(src)
  src.write_bytes(pickle.dumps([{"ref_id": 1}]))
  with pytest.raises(refcoco.UnsafePickleError, match=r"ref 0 lacks \['ann_id'"):
    refcoco.load_refs_pickle(src)
  src.write_bytes(b"not a pickle at all")
  with pytest.raises(refcoco.UnsafePickleError, match="not a readable pickle"):
    refcoco.load_refs_pickle(src)
