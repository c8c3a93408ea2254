"""Replay that the verifier controls, on the honest tiny run of tests/verify_runs.py: segments chosen by the
verifier's seed (never predictable from the certificate), bit-identical unless the verifier passes --tolerance
(edited hardware or update sizes in a re-signed certificate change nothing), coverage reported, and a request for
more than is replayable failed before anything runs. "from scratch" unqualified only when every step was replayed.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_verify_replay.py     (~1.5 min: one run, four replays)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distributed.train_env import cli
from safetensors.torch import load_file, save_file
from verify_runs import foreign_vision, recertify

from train.provenance.record import RECORD
from train.provenance.replay import choose, compare, replay_segment, replayable
from train.provenance.report import Report, qualify
from train.provenance.verify import verify


def test_replayable_links_need_both_ends_kept_and_say_why_not(honest_copy):
    rec = json.loads((honest_copy / RECORD).read_text())
    cands, missing = replayable(honest_copy, rec)
    assert [(i, s.name if s else None, e.name) for i, s, e in cands] == [
        (0, None, "step_000002"), (1, "step_000002", "step_000004"), (2, "step_000004", "step_000006")]
    assert missing == []
    shutil.rmtree(honest_copy.parent / "step_000002")  # pruned: the segments on either side can no longer be replayed
    cands, missing = replayable(honest_copy, rec)
    assert [i for i, _, _ in cands] == [2]
    assert missing == [{"link": 0, "steps": "0-2", "why": "checkpoint step_000002 (its end) is not kept"},
                       {"link": 1, "steps": "2-4", "why": "checkpoint step_000002 (its start) is not kept"}]


def test_the_segment_choice_is_the_verifiers_not_the_certificates(honest, honest_copy):
    """The trainer cannot know which segment a verifier replays: the choice follows the verifier's seed alone, and
    a certificate re-signed with other update sizes and hardware leaves it as it was."""
    rec = json.loads((honest_copy / RECORD).read_text())
    cands, _ = replayable(honest_copy, rec)
    picks = {seed: [c[0] for c in choose(cands, 1, seed)] for seed in range(40)}
    assert {p[0] for p in picks.values()} == {0, 1, 2}  # every segment can be the one
    assert picks[0] != picks[1], picks  # two verifier seeds, two different segments
    assert all(picks[s] == [c[0] for c in choose(cands, 1, s)] for s in picks)  # repeatable with the printed seed

    def inflate(r):
        r["chain"][-1]["update"] = {c: {"norm": 1e3, "relative": 1e3} for c in r["chain"][-1]["update"]}
        r["environment"]["hardware"] |= {"accelerators": ["NVIDIA H100 80GB HBM3"], "cpu_count": 208}
    recertify(honest_copy, honest[1], edit=inflate)
    edited = json.loads((honest_copy / RECORD).read_text())
    again, _ = replayable(honest_copy, edited)
    assert len(again) == 3
    assert all(picks[s] == [c[0] for c in choose(again, 1, s)] for s in picks)


def test_asking_more_than_is_replayable_fails_before_any_replay(honest, honest_copy):
    shutil.rmtree(honest_copy.parent / "step_000002")
    res = cli("verify", str(honest_copy), "--public-key", str(honest[2]), "--replay", "all", "--replay-seed", "5", check=False)
    assert res.returncode == 1, res.stdout
    lines = res.stdout.splitlines()
    assert lines[0] == "replay seed: 5 (repeat with --replay-seed 5)"
    want = ("asked for 3 segment(s) of 3, 1 replayable, so none replayed (ask for at most 1); not replayable: link 0 "
            "(steps 0-2): checkpoint step_000002 (its end) is not kept; link 1 (steps 2-4): checkpoint step_000002 "
            "(its start) is not kept")
    assert any(line.startswith("replay") and "coverage" in line and line.endswith(want) for line in lines), lines
    assert "  not replayable: link 1 (steps 2-4): checkpoint step_000002 (its start) is not kept" in lines
    assert lines[-1] == f"VERDICT: FAILED: replay coverage: {want}"
    rep = verify(honest_copy, honest[2], replay=4, replay_seed=5)
    assert [f["subject"] for f in rep.failures] == ["coverage"] and "asked for 4 segment(s) of 3" in rep.failures[0]["reason"]


def test_a_kept_end_point_that_does_not_verify_is_not_replayed(honest, honest_copy):
    rec = json.loads((honest_copy / RECORD).read_text())
    cands, _ = replayable(honest_copy, rec)
    seed = next(s for s in range(100) if [c[0] for c in choose(cands, 1, s)] == [1])  # link 1: steps 2-4
    state = honest_copy.parent / "step_000004" / "data_state.json"
    state.write_text(state.read_text().replace('"step": 4', '"step": 4 '))
    rep = verify(honest_copy, honest[2], replay=1, replay_seed=seed)
    assert [(f["subject"], f["reason"]) for f in rep.failures] == [
        ("link 1 (steps 2-4)", "kept end point does not verify: step_000004: files differ from its signature or its "
         "record: data_state.json; from kept step_000002")]


def test_only_the_verifiers_tolerance_accepts_a_difference(honest_copy, tmp_path):
    """Tolerance is measured against the segment's update between the kept checkpoints' weights, never the update
    sizes the certificate declares; without --tolerance any difference fails."""
    end, start = honest_copy / "model.safetensors", honest_copy.parent / "step_000004" / "model.safetensors"
    w6, w4 = load_file(end), load_file(start)
    near = tmp_path / "near.safetensors"  # a replay 1% of the segment's update away: another kind of hardware
    save_file({n: w6[n] + 0.01 * (w6[n] - w4[n]) for n in w6}, near)
    assert compare(end, end, lambda: w4, None) == (True, "bit-identical")
    ok, why = compare(end, near, lambda: w4, None)
    assert not ok and why.startswith("not bit-identical (") and "only the verifier's --tolerance" in why, why
    ok, why = compare(end, near, lambda: w4, 0.05)
    assert ok and why.startswith("within tolerance 0.05 x update"), why
    foreign_vision(honest_copy)  # the claimed end holds another model's vision encoder; the honest replay does not
    ok, why = compare(end, near, lambda: w4, 0.05)
    assert not ok and why.startswith("beyond tolerance 0.05 x update (vision_encoder: distance"), why


def test_sampled_replay_is_no_unqualified_from_scratch_unless_accepted():
    def report(replayed, accept):
        rep = Report(Path("step_000006"))
        rep.components = [{"component": "text_decoder", "verdict": "from scratch"}]
        rep.coverage = {"asked": len(replayed), "seed": 1, "tolerance": None, "links": 3, "steps": 6,
                        "replayed": replayed, "failed": [], "steps_replayed": 2 * len(replayed), "not_replayable": [],
                        "from_kept": [i for i in replayed if i and i - 1 not in replayed]}
        rep.accept_sampled = accept
        qualify(rep)
        return rep.components[0]["verdict"], rep.components[0]["basis"]
    assert report([2], False) == ("scratch init, path sampled", "init verified; 2 of 6 steps replayed (links 1 of 3); "
                                  "the rest declared, not replayed")
    assert report([2], True)[0] == "from scratch (sampled coverage accepted)"
    assert report([0, 1, 2], False) == ("from scratch", "init verified; every step replayed from init (6 steps, "
                                        "links 3 of 3)")


def test_replay_all_is_from_scratch_and_a_forged_end_is_caught_whatever_the_certificate_says(honest, honest_copy, tmp_path):
    res = cli("verify", str(honest_copy), "--public-key", str(honest[2]), "--replay", "all", "--replay-seed", "11",
              "--out", str(tmp_path / "CERT.md"), timeout=900)
    out = res.stdout.splitlines()
    for i, origin in enumerate(("init", "the replay of link 0", "the replay of link 1")):  # links in sequence
        assert any(line.startswith(f"replay        link {i} ") and line.endswith(f"bit-identical; from {origin}")
                   for line in out), out
    assert out[-1] == ("VERDICT: VERIFIED: signature, files, completeness and step-0 rebuild checked; every step "
                       "replayed from init (6 steps, links 3 of 3); components: 6 from scratch")
    assert "## Replay" in (tmp_path / "CERT.md").read_text()
    # The trainer's forged end point, with a certificate claiming other hardware and a huge update for the segment:
    # still only bit-identical counts.
    sd = load_file(honest_copy / "model.safetensors")
    save_file({k: v + 1e-3 * (1 + i % 3) for i, (k, v) in enumerate(sorted(sd.items()))}, honest_copy / "model.safetensors",
              metadata={"format": "pt"})

    def disguise(r):
        r["chain"][2]["update"] = {c: {"norm": 1e3, "relative": 1e3} for c in r["chain"][2]["update"]}
        r["environment"]["hardware"] |= {"accelerators": ["NVIDIA H100 80GB HBM3"], "cpu_count": 208}
    recertify(honest_copy, honest[1], edit=disguise)
    assert not verify(honest_copy, honest[2]).failures  # every static check passes: only replay can tell
    ok, why = replay_segment(json.loads((honest_copy / RECORD).read_text()), 2, honest_copy.parent / "step_000004", honest_copy)
    assert not ok and why.startswith("not bit-identical (") and "only the verifier's --tolerance" in why, why
