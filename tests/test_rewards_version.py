"""A verifier's scores are stored with its version (apo_core.rewards.REWARD_VERSIONS), so the
reference-sample store never reuses rewards a changed verifier might score differently. This
test holds the source each version was recorded with: change a verifier's code and it fails
until the version is bumped and the new source digest recorded here."""

import hashlib
import inspect

from apo_core import math_equivalence, rewards

# the code each verifier's scores depend on
SOURCES = {
    "gsm8k": [rewards._NUMBER.pattern, rewards._numbers, rewards.extract_final_number, rewards.gsm8k_reward,
              math_equivalence.last_boxed],
    "math": [math_equivalence],
}
SOURCES["embedded"] = SOURCES["gsm8k"]  # the embedded task is scored by GSM8K's verifier
# name -> (version, sha256 of its source at that version)
RECORDED = {
    "gsm8k": (1, "af0f2b9bbf4398029d17ccf1c5464cfd38775b6b5c1fc631828a006c5e70b47e"),
    "math": (1, "c643e62f1e6176b353c376e06291d46bed4ed4dd6d8d2b8ae4b0ebd266a76813"),
    "embedded": (1, "af0f2b9bbf4398029d17ccf1c5464cfd38775b6b5c1fc631828a006c5e70b47e"),
}


def source_digest(name: str) -> str:
    parts = [p if isinstance(p, str) else inspect.getsource(p) for p in SOURCES[name]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def test_every_verifier_is_versioned():
    assert set(rewards.REWARD_VERSIONS) == set(rewards.REWARDS) == set(RECORDED)


def test_a_verifier_whose_source_changed_has_a_new_version():
    for name, (version, digest) in RECORDED.items():
        now = source_digest(name)
        if now != digest:
            assert rewards.REWARD_VERSIONS[name] != version, (
                f"the {name} verifier's source changed (sha256 {now}) but REWARD_VERSIONS[{name!r}] is still {version}: "
                f"bump it, then record ({rewards.REWARD_VERSIONS[name]}, {now!r}) in RECORDED")
            raise AssertionError(f"record the {name} verifier's new version in RECORDED: ({rewards.REWARD_VERSIONS[name]}, {now!r})")
        assert rewards.REWARD_VERSIONS[name] == version, f"REWARD_VERSIONS[{name!r}] moved without RECORDED: record it"


def test_the_version_names_math_verify_for_math():
    from importlib.metadata import version

    assert rewards.reward_version("gsm8k") == "gsm8k-v1"
    assert rewards.reward_version("math") == f"math-v1+math-verify-{version('math-verify')}"
