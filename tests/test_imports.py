"""apo_core is pure algorithm: importing it pulls in no orchestration or storage library."""

import subprocess
import sys


def test_apo_core_imports_no_orchestration():
    code = (
        "import sys, apo_core.config, apo_core.objectives, apo_core.rewards, apo_core.engines, "
        "apo_core.modeling, apo_core.trainer, apo_core.rollouts, apo_core.data, apo_core.embedded, apo_core.tokenizer\n"
        "bad = [m for m in ('prefect', 'mlflow', 'fsspec', 's3fs', 'boto3') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"apo_core imported {out.stdout.strip()}"
