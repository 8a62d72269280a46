"""The demo's pure pieces: the count-up reward, GRPO advantages, prompts, config, QAT checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightsync.quant import Int4Config
from weightsync_demo.config import DemoConfig
from weightsync_demo.qat import check_shard
from weightsync_demo.report import Report, StepRecord, table
from weightsync_demo.task import (
    count_up_correct,
    count_up_reward,
    group_advantages,
    make_prompts,
)


def test_count_up_reward_counts_successors_from_the_prompt_end():
    assert count_up_reward([7, 3], [4, 5, 6, 7], vocab=32) == 1.0
    assert count_up_reward([7, 3], [5, 6, 0, 1], vocab=32) == 0.5  # 5 != 3+1, 6 = 5+1, 0, 1
    assert count_up_reward([9], [9, 9, 9, 9], vocab=32) == 0.0
    # Wraps around the vocabulary.
    assert count_up_reward([30], [31, 0, 1], vocab=32) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        count_up_reward([1], [], vocab=32)


def test_count_up_correct_credits_each_token_and_averages_to_the_reward():
    correct = count_up_correct([7, 3], [5, 6, 0, 1], vocab=32)
    assert correct == [0.0, 1.0, 0.0, 1.0]
    assert sum(correct) / 4 == count_up_reward([7, 3], [5, 6, 0, 1], vocab=32)


def test_per_token_advantages_normalize_each_position_within_its_group():
    """[prompts, samples, tokens]: position 0 differs within the group, position 1 does not
    (no signal there), the other prompt's group is normalized on its own."""
    correct = torch.tensor(
        [
            [[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]],
            [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
        ]
    )
    adv = group_advantages(correct)
    assert adv.shape == correct.shape
    per_sample = group_advantages(correct[:, :, 0])
    torch.testing.assert_close(adv[:, :, 0], per_sample)  # a position is a sample reward
    assert (adv[0, :, 1] == 0).all() and (adv[1, :, 0] == 0).all()
    assert adv[1, 1, 1] > 0 > adv[1, 0, 1]


def test_prompts_are_deterministic_per_seed_and_step():
    a = make_prompts(seed=0, step=3, num=8, length=4, vocab=32)
    assert a == make_prompts(seed=0, step=3, num=8, length=4, vocab=32)
    assert a != make_prompts(seed=0, step=4, num=8, length=4, vocab=32)
    assert a != make_prompts(seed=1, step=3, num=8, length=4, vocab=32)
    assert len(a) == 8 and all(len(p) == 4 and all(0 <= t < 32 for t in p) for p in a)


def test_group_advantages_normalize_within_each_prompt():
    rewards = torch.tensor([[0.0, 1.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])
    adv = group_advantages(rewards)
    std = torch.tensor([0.0, 1.0, 0.5, 0.5]).std()
    torch.testing.assert_close(adv[0], (torch.tensor([-0.5, 0.5, 0.0, 0.0]) / std).float())
    # All samples equal: no signal, zero advantage (not NaN).
    assert torch.equal(adv[1], torch.zeros(4))
    with pytest.raises(ValueError, match="samples >= 2"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="expected"):
        group_advantages(torch.zeros(6))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=8),
        min_size=1,
        max_size=6,
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_group_advantages_properties(rows):
    r = torch.tensor(rows, dtype=torch.float64)
    adv = group_advantages(r)
    assert adv.shape == r.shape and torch.isfinite(adv).all()
    torch.testing.assert_close(
        adv.double().sum(dim=1), torch.zeros(len(rows), dtype=torch.float64), atol=1e-4, rtol=0
    )
    # Higher reward, higher advantage, within a group.
    for row_r, row_a in zip(r, adv, strict=True):
        order = torch.argsort(row_r)
        assert (row_a[order].diff() >= -1e-6).all()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("samples_per_prompt", 1, "GRPO needs >= 2"),
        ("steps", 0, "steps=0"),
        ("lr", 0.0, "lr=0.0"),
        ("engine", "tgi", "engine='tgi'"),
        ("vocab_size", 33, "divisible by tp=2"),
        ("num_workers", 3, "multiple of tp=2"),
    ],
)
def test_demo_config_rejects_bad_fields(field, value, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(**{field: value})


def test_external_sglang_needs_a_url():
    with pytest.raises(ValueError, match="needs engine_url"):
        DemoConfig(engine="sglang")
    assert DemoConfig(engine="sglang", engine_url="http://h:30000").batch_size == 64


def test_qat_shard_check_row_parallel_groups():
    shard = torch.empty(128, 64)  # o_proj shard under tp=2: input width 64
    check_shard("linear_proj", shard, Int4Config(group_size=32), row_parallel=True, tp=2)
    with pytest.raises(ValueError, match="group_size=128 does not divide the shard's input"):
        check_shard("linear_proj", shard, Int4Config(group_size=128), row_parallel=True, tp=2)
    with pytest.raises(ValueError, match="per-channel"):
        check_shard("linear_proj", shard, Int4Config(group_size=-1), row_parallel=True, tp=2)
    # Column-parallel shards hold whole rows: per-channel is exact there.
    check_shard("linear_qkv", torch.empty(64, 128), Int4Config(group_size=-1), False, tp=2)


def test_report_table_and_summary(tmp_path):
    sync = dict(
        version=1,
        export_s=0.1,
        quantize_s=0.0,
        transfer_s=0.2,
        engine_load_s=0.05,
        pause_s=0.3,
        total_s=0.4,
    )
    steps = [
        StepRecord(
            step=i,
            reward=r,
            logprob_diff=0.001,
            rollout_version=str(i),
            sample_versions=[str(i)] * 4,
            loss=0.0,
            rollout_s=1.0,
            train_s=0.5,
            sync=sync | {"version": i + 1},
            engine_version=str(i + 1),
        )
        for i, r in enumerate([0.1, 0.2, 0.3, 0.6])
    ]
    report = Report(config={"steps": 4}, steps=steps)
    assert report.summary()["reward_first"] == 0.1 and report.summary()["reward_last"] == 0.6
    lines = table(report).splitlines()
    assert len(lines) == 5 and lines[-1].split()[:3] == ["3", "0.600", "0.0010"]
    json_path, png_path = report.write(tmp_path)
    assert json_path.exists() and png_path.stat().st_size > 10_000


def test_cli_flags_become_the_demo_and_sync_configs():
    from weightsync.cli import build_parser
    from weightsync_demo.app import demo_config, sync_config

    parser = build_parser()
    defaults = parser.parse_args(["demo"])
    assert demo_config(defaults) == DemoConfig()
    assert sync_config(defaults).verify == "sample"  # vLLM reads the weights back
    args = parser.parse_args(
        ["demo", "--int4", "--steps", "5", "--out", "o", "--transport", "ipc", "--stage-mib", "0"]
    )
    cfg, sync = demo_config(args), sync_config(args)
    assert (cfg.int4, cfg.steps, cfg.out_dir) == (True, 5, "o")
    assert (sync.transport, sync.stage_bytes) == ("ipc", 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--engine", "tgi"])
    with pytest.raises(ValueError, match="steps=0"):
        demo_config(parser.parse_args(["demo", "--steps", "0"]))


class _NotInstalled:
    """A meta-path finder that answers for ``weightsync_demo`` as an absent package would."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "weightsync_demo":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def test_cli_says_when_the_demo_package_is_missing(monkeypatch, capsys):
    import sys

    from weightsync.cli import main

    for name in [m for m in sys.modules if m.split(".")[0] == "weightsync_demo"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled, *sys.meta_path])
    assert main(["demo", "--steps", "1"]) == 2
    assert "weightsync_demo` is not installed" in capsys.readouterr().err


# --- off-policy: per-token versions, staleness, TIS (the --async loop) ----------------------


def test_spans_expand_to_one_version_per_token():
    from weightsync_demo.rollout import Sample, token_versions

    spans = [{"version": "3", "start": 0, "end": 2}, {"version": "4", "start": 2, "end": 5}]
    versions = token_versions(spans, 5, "req-1")
    assert versions == ["3", "3", "4", "4", "4"]
    mixed = Sample([1], [2, 3, 4, 5, 6], [0.0] * 5, versions)
    assert mixed.weight_version is None  # an update landed mid-sample
    assert Sample([1], [2], [0.0], ["7"]).weight_version == "7"
    assert token_versions([{"version": 2, "start": 0, "end": 1}], 1, "r") == ["2"]  # as str


@pytest.mark.parametrize(
    ("spans", "match"),
    [
        (
            [{"version": "1", "start": 0, "end": 2}, {"version": "2", "start": 3, "end": 4}],
            r"\[2\]",
        ),
        ([{"version": "1", "start": 0, "end": 3}], r"\[3\]"),
        (None, r"\[0, 1, 2, 3\]"),
        ([{"version": "1", "start": 0, "end": 5}], "outside its 4"),
        (
            [{"version": "1", "start": 0, "end": 3}, {"version": "2", "start": 2, "end": 4}],
            "overlap",
        ),
    ],
    ids=["gap", "short", "none", "past-the-end", "overlap"],
)
def test_spans_that_miss_a_token_name_the_request(spans, match):
    from weightsync_demo.rollout import token_versions

    with pytest.raises(RuntimeError, match="vllm request abc choice 0") as err:
        token_versions(spans, 4, "vllm request abc choice 0")
    assert err.match(match)


def test_staleness_is_the_trained_version_minus_the_oldest_token():
    from weightsync_demo.offpolicy import check_staleness, must_wait, staleness, version_number

    assert version_number("default") == 0 and version_number("12") == 12
    with pytest.raises(ValueError, match="'policy@v1'"):
        version_number("policy@v1")
    assert staleness(5, ["5", "5"]) == 0
    assert staleness(5, ["4", "4", "5"]) == 1  # spans the update to 5: its oldest token counts
    assert staleness(1, ["default", "1"]) == 1
    with pytest.raises(ValueError, match="newer than the trainer"):
        staleness(2, ["3"])
    with pytest.raises(ValueError, match="at least one token"):
        staleness(2, [])
    # Rollouts for step 3 on an engine serving 1: 2 behind at worst.
    assert must_wait(3, served=1, max_staleness=1) and not must_wait(3, 1, max_staleness=2)
    assert not must_wait(1, served=0, max_staleness=1)
    check_staleness(3, [0, 1, 1], max_staleness=1)
    with pytest.raises(RuntimeError, match="step 3: a sample is 2 versions stale, max_staleness=1"):
        check_staleness(3, [0, 2, 1], max_staleness=1)


def test_tis_weights_are_the_capped_ratio_without_gradient():
    from weightsync_demo.offpolicy import tis_weights

    trainer = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    rollout = torch.tensor([[-1.0, -1.0, -2.0]])
    w = tis_weights(trainer, rollout, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, float(torch.exp(torch.tensor(-1.0))), 2.0]]))
    assert not w.requires_grad  # exp(1.5) = 4.48 was capped at 2 above
    # The weight scales each token's gradient and is not differentiated itself.
    advantages = torch.tensor([[1.0, -1.0, 2.0]])
    (w * advantages * trainer).sum().backward()
    torch.testing.assert_close(trainer.grad, w * advantages)
    with pytest.raises(ValueError, match="cap=0"):
        tis_weights(trainer, rollout, cap=0)
    with pytest.raises(ValueError, match="rollout_logprobs shape"):
        tis_weights(trainer, rollout[:, :2], cap=2.0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"max_staleness": 0}, "max_staleness=0 must be >= 1"),
        ({"tis_cap": 0.0}, "tis_cap=0.0 must be > 0"),
        ({"asynchronous": True, "lora_rank": 8}, "asynchronous: not with lora_rank=8"),
    ],
)
def test_demo_config_rejects_bad_off_policy_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(**fields)


def test_cli_async_flags_and_their_pause_mode():
    from weightsync.cli import build_parser
    from weightsync_demo.app import demo_config, sync_config

    parser = build_parser()
    assert sync_config(parser.parse_args(["demo"])).pause_mode == "retract"
    args = parser.parse_args(["demo", "--async", "--max-staleness", "2", "--tis-cap", "3"])
    cfg = demo_config(args)
    assert (cfg.asynchronous, cfg.max_staleness, cfg.tis_cap) == (True, 2, 3.0)
    # In-flight rollouts survive the switch; their old-version KV is dropped in the pause.
    assert (sync_config(args).pause_mode, sync_config(args).kv_cache) == ("in_place", "recompute")
    sglang = parser.parse_args(["demo", "--async", "--engine", "sglang", "--engine-url", "u"])
    assert sync_config(sglang).pause_mode == "retract"  # SGLang keeps no KV across in_place
    explicit = parser.parse_args(["demo", "--async", "--pause-mode", "retract"])
    assert sync_config(explicit).pause_mode == "retract"
    with pytest.raises(ValueError, match="pause_mode='abort' with --async"):
        sync_config(parser.parse_args(["demo", "--async", "--pause-mode", "abort"]))
    with pytest.raises(ValueError, match="asynchronous: not with lora_rank=8"):
        demo_config(parser.parse_args(["demo", "--async", "--lora"]))
    with pytest.raises(ValueError, match="max_staleness=0"):
        demo_config(parser.parse_args(["demo", "--async", "--max-staleness", "0"]))


def test_report_table_shows_staleness_and_an_all_stale_step():
    record = StepRecord(
        step=1,
        reward=0.5,
        logprob_diff=None,
        rollout_version=None,
        sample_versions=[None],
        loss=0.0,
        rollout_s=0.1,
        train_s=0.1,
        sync={"version": 2},
        engine_version="2",
        staleness_max=1,
        staleness_mean=0.75,
        tis_mean=0.98,
    )
    report = Report(config={}, steps=[record])
    row = table(report).splitlines()[1].split()
    assert row[:7] == ["1", "0.500", "-", "None", "1", "0.75", "0.980"]
    assert report.summary()["max_logprob_diff"] is None
    assert report.summary()["max_staleness"] == 1
