"""End to end through the command line and the benchmark script, on tiny local checkpoints."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_generate_json(tiny_model_dir):
    done = run("-m", "opt_fast.cli", "generate", "--model", str(tiny_model_dir), "--prompt", "import os",
               "--prompt", "def f(x):", "--max-tokens", "5", "--temperature", "0", "--ignore-eos",
               "--kernels", "torch", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["import os", "def f(x):"]
    assert all(len(r["outputs"][0]["token_ids"]) == 5 and r["outputs"][0]["finish_reason"] == "length"
               for r in rows)


def test_generate_reports_bad_input_without_a_traceback(tiny_model_dir):
    done = run("-m", "opt_fast.cli", "generate", "--model", str(tiny_model_dir), "--prompt", "x",
               "--top-p", "1.5")
    assert done.returncode == 2
    assert "top_p" in done.stderr and "Traceback" not in done.stderr


def test_bench_generate_smoke(tmp_path):
    done = run("benchmarks/bench_generate.py", "--smoke", "--sizes", "opt-350m", "--num-prompts", "2",
               "--input-len", "8", "--output-len", "3", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_generate.json").read_text())
    assert report["rows"][0]["size"] == "opt-350m" and report["rows"][0]["opt_fast_tok_s"] > 0
    assert (tmp_path / "bench_generate.md").read_text().startswith("# LLM.generate vs HF generate")
