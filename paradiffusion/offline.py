"""No network unless the user asked for a download.

Some libraries we use reach out on import or start-up: albumentations (imported by img2dataset)
asks PyPI for a newer version of itself on every import, Ray may report usage statistics, the
Hugging Face Hub client sends telemetry. None of that is a download the user asked for, and on a
cluster node without internet each one costs a time-out. :data:`NO_PHONE_HOME` are the libraries'
own opt-outs; :func:`apply` sets them (without overriding a value the user set) in this process,
so every process it starts inherits them: img2dataset and Ray workers on this machine, DeepSpeed
ranks, the voting server. Workers of a Ray cluster on other nodes get them through the job's
runtime environment (:mod:`paradiffusion.raycluster`). Importing :mod:`paradiffusion` applies them.

Downloads the user asks for (``paradiffusion models fetch``, ``download``) are not affected.
``tests/pipelines/test_demo_s3.py`` runs the demo with every outbound connection refused and
recorded, and checks that nothing tried.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: Each library's documented opt-out of calls home that happen without a user's request.
NO_PHONE_HOME: dict[str, str] = {
    # albumentations/check_version.py: a request to pypi.org on import unless this is set
    "NO_ALBUMENTATIONS_UPDATE": "1",
    # Ray's usage statistics report (ray._common.usage / usage_lib)
    "RAY_USAGE_STATS_ENABLED": "0",
    # huggingface_hub telemetry (hf_hub.utils.send_telemetry)
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # the cross-tool convention (Gradio, Streamlit, Hugging Face libraries and others read it)
    "DO_NOT_TRACK": "1",
}


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every opt-out that is not set yet; returns the variables as they now are."""
    env = os.environ if environ is None else environ
    for k, v in NO_PHONE_HOME.items():
        env.setdefault(k, v)
    return {k: env[k] for k in NO_PHONE_HOME}
