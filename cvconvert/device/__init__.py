"""The device side of cvconvert: everything a phone or an edge box installs, and nothing it does not.

Torch-free by layout (tests/test_device_imports.py imports every module here and checks that torch is not
loaded): numpy, onnxruntime and the standard library only.

- `artifacts`: the model dir's manifest, the export record, hashes, atomic writes and file locks;
- `contracts`: the ONNX graphs as data (names, shapes, how x is formed);
- `keys`: the secret keys, from the OS's CSPRNG; `keylaws`: how a model's keys are drawn (one registry line a law);
- `sessions`: ONNX Runtime sessions with the measured options;
- `graphs`: the graph runner (encoder -> processing, local or remote -> decoder);
- `fools`: the device-private fool pool, each fool used once; `foolrules`: the picking rules (random, match);
  `pool_audit`: can the pool be told from what was sent;
- `guard`: the device's memory of what it has sent; `screen`: the cloud's principal-angle attack, run before sending;
  `mirror`: fools that mirror an earlier transmission's, for an image related to one sent before;
- `state`: the state folder and its generation number; `journal`: reservations, safe retries and releases;
- `pipeline`: the policy over the runner (pool, guard, keys, journal) that every caller goes through;
- `preprocess`: images into the model's input; `remote`: the KServe v2 client for a cloud processing part.

This `__init__` imports nothing, so that `keys` or `contracts` load without onnxruntime.
"""
