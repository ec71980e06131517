"""`cvconvert serve`: an ONNX graph behind the KServe Open Inference Protocol v2 (REST) with Triton's
binary tensor data extension, so `tritonclient.http` and any v2 client work unchanged.

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/{name}[/versions/{v}] | .../ready | .../config
    POST /v2/models/{name}[/versions/{v}]/infer

Modules, from the wire inwards:
- `connection`: uvicorn's h11 protocol with header and body deadlines; short paths in the access log;
- `body`: request bodies under a size limit, a deadline and a byte budget shared by all requests;
- `protocol`: the v2 wire format (JSON and binary tensors), shared with the device's client
  (`cvconvert.device.remote`); numpy and the standard library only, like `jsontensor`, which reads JSON
  tensor data into arrays of the declared shape with bounded memory, and `errors` (RequestError);
- `model`: the served ONNX graph (`load_served_model`) and its v2 metadata;
- `batching`: optional dynamic batching of concurrent requests;
- `app`: the Starlette app, one module-level handler per endpoint over `app.state`;
- `run`: the listening socket, uvicorn's settings, and `BackgroundServer` for tests and benchmarks.

Needs only onnxruntime, numpy and the ASGI stack (Starlette on uvicorn): no torch, so the cloud machine
stays small. The server sees only what the device sends (the rotated feature x), never theta. This
package's `__init__` imports nothing, so the device can use `protocol` without the server's stack.
"""
