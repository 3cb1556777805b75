"""A GCS JSON API on localhost for the gs:// tests: `gcp-storage-emulator`, with two things real GCS
does that the emulator (2026.7) does not, and that the code under test relies on:

- media downloads carry `x-goog-generation` / `x-goog-metageneration` headers. tensorstore (orbax's
  OCDBT checkpoints) reads an object's generation from them and fails with "Malformed
  StorageGeneration" without them;
- uploads honour the `ifGenerationMatch` precondition (412 when the object's generation differs;
  0 = "only if absent"). The workdir lock's create-if-absent is this precondition.

The server answers one request at a time (http.server.HTTPServer), so the check and the write of an
upload are atomic, as on GCS. Run as a script: `python tests/gcs_emulator.py PORT BUCKET`.
"""

import http
import logging
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _upload_name(request) -> str | None:
  if "name" in request.query:
    return request.query["name"][0]
  data = request.data
  if isinstance(data, dict):
    return (data.get("meta") or data).get("name")
  return None


def _with_precondition(insert):
  def handler(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    if wanted and "upload_id" not in request.query:
      try:
        current = storage.get_file_obj(request.params["bucket_name"], _upload_name(request))
        generation = str(current.get("generation"))
      except NotFound:
        generation = "0"
      if generation != wanted[0]:
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}})  # fmt: skip
        return None
    return insert(request, response, storage, *args, **kwargs)

  return handler


def _with_generation_headers(download):
  def handler(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status in (http.HTTPStatus.OK, http.HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj.get("generation"))
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  return handler


def patch() -> None:
  """Replaces the emulator's upload and download handlers (in its route table too)."""
  replaced = {
    objects.insert: _with_precondition(objects.insert),
    objects.download: _with_generation_headers(objects.download),
  }
  objects.insert, objects.download = replaced[objects.insert], replaced[objects.download]
  server.HANDLERS = tuple(
    (regex, {method: replaced.get(fn, fn) for method, fn in handlers.items()})
    for regex, handlers in server.HANDLERS
  )


def main(port: int, bucket: str) -> None:
  logging.basicConfig(level=logging.CRITICAL)
  patch()
  server.create_server("localhost", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
