"""`cvconvert bench` and the fast processing graph: every field of the report, pooling formulations
(eager and exported) against a brute-force loop including ties, and export validation of the graph."""

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from cvconvert.cli.main import app
from cvconvert.complex import CDelta, CMaxModPool2d, rotate
from reference import brute_maxmod, tied
from cvconvert.graphopt import custom_translations
from cvconvert.complex.layers import max_pool_gaps
from cvconvert.errors import CvError
from cvconvert.export import compare_outside_ties
from cvconvert.device.sessions import SESSION_CONFIG, SESSION_CONFIG_KEY, add_session_config, create_session, session_config, session_options

runner = CliRunner()


def export_session(module, example, tmp_path, name):
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(module.eval(), (example,), str(path), input_names=["x"], output_names=["h"], dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("N", min=1)},), opset_version=18, external_data=False,
                      custom_translation_table=custom_translations(), verbose=False)
    return ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_pooling_graph_matches_brute_force_with_ties(k, s, p, tmp_path):
    pool = CMaxModPool2d(k, s, p)
    sess = export_session(pool, torch.randn(2, 2, 4, 7, 6), tmp_path, f"pool{k}{s}{p}")
    # N, C >= 2 (a per-plane / flattened index mix-up only shows there), random data and all-ties data,
    # at a batch size other than the export example's.
    for x in (torch.randn(3, 2, 4, 7, 6), tied(3, 4, 7, 6)):
        want = brute_maxmod(x, k, s, p)
        torch.testing.assert_close(pool(x), want, rtol=0, atol=0)
        np.testing.assert_array_equal(sess.run(None, {"x": x.numpy()})[0], want.numpy())
    # The tie rule really decides something here: the last maximum would differ.
    x = tied(2, 2, 4, 4)
    assert not torch.equal(brute_maxmod(x, 2, 2, 0), x[..., 1::2, 1::2])


@pytest.mark.parametrize("delta", [CDelta(c=1.0), CDelta(c=0.5), CDelta(mode="channel")], ids=["c1", "c05", "channel"])
def test_delta_graph_matches_eager_and_is_equivariant(delta, tmp_path):
    sess = export_session(delta, torch.randn(2, 2, 3, 5, 5), tmp_path, "delta")
    x = torch.randn(4, 2, 3, 5, 5) * 2
    y = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, delta(x).numpy(), rtol=1e-5, atol=1e-6)
    t = torch.rand(4) * 2 * math.pi
    y_rot = sess.run(None, {"x": rotate(x, t).numpy()})[0]
    np.testing.assert_allclose(y_rot, rotate(torch.from_numpy(y), t).numpy(), rtol=1e-4, atol=1e-5)


def test_session_config_round_trip(tmp_path):
    """A graph's recorded ORT options are read back, and a session is re-made with them."""
    import onnx

    export_session(CDelta(c=1.0), torch.randn(2, 2, 1, 2, 2), tmp_path, "cfg")
    path = tmp_path / "cfg.onnx"
    proto = onnx.load(str(path))
    add_session_config(proto, {"graph_optimization_level": "ORT_ENABLE_EXTENDED"})
    add_session_config(proto, {"graph_optimization_level": "ORT_ENABLE_BASIC"})  # replaces, never duplicates
    assert [p.key for p in proto.metadata_props].count(SESSION_CONFIG_KEY) == 1
    onnx.save(proto, str(path))
    sess = create_session(path, ["CPUExecutionProvider"], threads=1)
    assert session_config(sess)["graph_optimization_level"] == "ORT_ENABLE_BASIC"
    with pytest.raises(CvError, match="session config"):
        session_options(1, {"graph_optimization_level": "ORT_FASTEST"})
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(CvError, match="cannot load"):
        create_session(bad, ["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A LeNet split network on 16x16 inputs, exported by `cvconvert export` (processing has two
    max-modulus pools and four delta layers: the formulations above, inside the validated export);
    the exchange key law, so the online path's numpy combine sees both fool signs in its keys."""
    from cvconvert.build import convert_to_dir
    from cvconvert.export import export_model_dir

    d = tmp_path_factory.mktemp("bench") / "lenet"
    convert_to_dir("lenet", d, input_shape=(1, 16, 16), num_classes=3, key_law="exchange")
    report = export_model_dir(d)
    return d, report


def test_exported_fast_graph_passes_validation(tiny):
    _, report = tiny
    # export_model_dir raises on any mismatch; check that the checks ran on the fast formulations.
    assert report["ok"] and report["rotation"]["max_abs_diff"] < 1e-4
    import onnx
    ops = {n.op_type for n in onnx.load(str(tiny[0] / "onnx" / "processing.onnx")).graph.node}
    assert {"ReduceL2", "Mod", "GatherElements"} <= ops  # delta's modulus; pooling's per-plane index
    assert "Split" not in ops and "Transpose" not in ops
    # Every graph carries the measured session options, and the runtime's sessions read them back.
    from cvconvert.device.graphs import PARTS
    from cvconvert.device.sessions import make_session
    for part in PARTS:
        sess = make_session(tiny[0] / "onnx" / f"{part}.onnx", "cpu")
        assert session_config(sess) == SESSION_CONFIG


def test_bench_json_has_every_field(tiny, tmp_path):
    d, _ = tiny
    threads = torch.get_num_threads()
    png = tmp_path / "bench.png"
    res = runner.invoke(app, ["bench", str(d), "--batch-sizes", "1,2", "--repeats", "2", "--warmup", "1",
                              "--provider", "cpu", "--threads", "1", "--json", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    from PIL import Image
    with Image.open(png) as im:  # a real PNG, two panels wide (one per batch size)
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # no temporary file left behind
    assert torch.get_num_threads() == threads  # --threads does not leak into the caller's process
    report = json.loads(res.stdout)
    for key in ("device", "engines", "batch_sizes", "repeats", "warmup", "threads", "results", "ratios",
                "peak_rss_mb", "peak_rss_mb_after_batch", "machine", "graphs", "baseline", "arch"):
        assert key in report, key
    assert report["device"] == "cpu" and report["batch_sizes"] == [1, 2]
    combos = {(r["batch"], r["model"], r["engine"], r["stage"]) for r in report["results"]}
    common = ("encoder", "processing", "decoder", "end_to_end")
    assert combos == {(n, m, e, s) for n in (1, 2) for e in ("ort", "eager")
                      for m, stages in (("complex", common + ("features", "online")), ("original", common))
                      for s in stages}
    for r in report["results"]:
        assert r["runs"] == 2
        assert 0 < r["p50_ms"] <= r["p90_ms"] and r["throughput_per_s"] > 0
    kinds = {(r["kind"], r["stage"]) for r in report["ratios"]}
    assert ("complex/original", "processing") in kinds and ("ort/eager", "end_to_end") in kinds
    assert all(r["ratio"] > 0 for r in report["ratios"])
    # online and features are set against the original's end to end and encoder
    p50 = {(r["batch"], r["model"], r["engine"], r["stage"]): r["p50_ms"] for r in report["results"]}
    co = {(r["batch"], r["engine"], r["stage"]): r for r in report["ratios"] if r["kind"] == "complex/original"}
    for n in (1, 2):
        for stage, base in (("online", "end_to_end"), ("features", "encoder"), ("processing", "processing")):
            r = co[(n, "ort", stage)]
            assert r["baseline_stage"] == base
            assert r["ratio"] == pytest.approx(p50[(n, "complex", "ort", stage)] / p50[(n, "original", "ort", base)])
    assert report["graphs"]["complex"].endswith("onnx")  # DIR/onnx/ from the export, not re-exported
    assert report["peak_rss_mb"] > 0


def test_bench_table_and_bad_inputs(tiny, tmp_path):
    d, _ = tiny
    # eager only: no ONNX graphs needed (the ORT path is covered above)
    res = runner.invoke(app, ["bench", str(d), "--batch-sizes", "2", "--repeats", "1", "--warmup", "0",
                              "--engines", "eager", "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    assert "cplx/orig" in res.stdout and "end_to_end" in res.stdout and "peak memory" in res.stdout
    for args, msg in [(["--batch-sizes", "1,x"], "batch-sizes"), (["--batch-sizes", "0"], "positive"),
                      (["--repeats", "0"], "repeats"), (["--provider", "tpu"], "provider"),
                      (["--engines", "tvm"], "engines"), (["--plot", str(tmp_path / "no" / "b.png")], "does not exist")]:
        res = runner.invoke(app, ["bench", str(d), *args])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (args, res.output)
    res = runner.invoke(app, ["bench", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["bench", str(d), "--baseline", str(d)])
    assert res.exit_code == 2 and "not an original" in res.output


def _quarter_keys(n):
    """Exchange-law keys at two angles in each quarter-circle: both fool signs occur."""
    from cvconvert.device.keylaws import KEY_LAWS
    from cvconvert.device.keys import secure_angles
    return KEY_LAWS["exchange"].of_angle((secure_angles(n) / 4 + (np.arange(n) % 4) * (np.pi / 2)).astype(np.float32))


def test_online_path_computes_what_the_encoder_path_does(tiny):
    """bench's online path (features.onnx + a precomputed fool feature + numpy combine + processing +
    decoder) gives the logits of the full chain for the same image, fool and key, in ONNX Runtime and
    eager; with another fool's feature it does not, so the comparison can fail. (The sign rule is checked
    on x in test_export: with real weights Re[Phi(a - ib)] = Re[Phi(a + ib)], so logits cannot see it.)"""
    from cvconvert.bench import EagerPipeline, OrtPipeline, stage_feeds
    from cvconvert.modeldir import load_model

    d, _ = tiny
    model, manifest = load_model(d)
    assert manifest["key_law"] == "exchange"
    feeds = stage_feeds(model, 8)
    feeds["end_to_end"]["key"] = feeds["online"]["key"] = _quarter_keys(8)  # both fool signs
    assert np.array_equal(feeds["online"]["image"], feeds["end_to_end"]["image"])
    paths = {p: d / "onnx" / f"{p}.onnx" for p in ("encoder", "features", "processing", "decoder")}
    ort_pipe = OrtPipeline(paths, "cpu", 1, True)
    assert ort_pipe.stages == ("encoder", "features", "processing", "decoder", "end_to_end", "online")
    want = ort_pipe.run("end_to_end", feeds["end_to_end"])
    eager = EagerPipeline(model, "cpu")
    e = {k: eager.prepare({k: feeds[k]})[k] for k in ("end_to_end", "online")}
    with max_pool_gaps(model.processing) as pools:  # a sample at a max-modulus tie may flip (export.TIE_GAP)
        eager_want = eager.run("end_to_end", e["end_to_end"]).numpy()
    compare_outside_ties("online vs end to end", ort_pipe.run("online", feeds["online"]), want, pools.gaps, 1e-5, 1e-4)
    other = {**feeds["online"], "b": np.roll(feeds["online"]["b"], 1, axis=0)}
    assert np.abs(ort_pipe.run("online", other) - want).max() > 1e-3
    compare_outside_ties("eager online", eager.run("online", e["online"]).numpy(), eager_want, pools.gaps, 1e-5, 1e-4)
    compare_outside_ties("eager vs ORT", eager_want, want, pools.gaps, 1e-4, 1e-3)
