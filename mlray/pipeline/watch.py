"""The canary and its end: raise the challenger's weight step by step while it stays within bounds, then
promote it to champion or roll it back, with the reason.

The weight lives in the registry (:data:`mlray.registry.CHALLENGER_WEIGHT_TAG`); the app's watcher reads
it and hands it to every replica, so it changes without a redeploy. The figures come from the app's own
counters (:mod:`mlray.serving.traffic`), read as the difference between two snapshots.
"""

from __future__ import annotations

import time
from typing import Any

from mlray import registry
from mlray.errors import MlrayError, PromotionRefused
from mlray.pipeline.canary import CanaryDecision, CanaryPolicy
from mlray.pipeline.steps import Context, StepResult
from mlray.registry import tracking
from mlray.serving.traffic import window


def _apply_weight(ctx: Context, weight: float) -> None:
    """Set the weight in the registry and wait until every live replica applies it."""
    from mlray.serving.deploy import rollout, traffic

    registry.set_challenger_weight(ctx.name, weight)
    rollout(ctx.app, timeout_s=ctx.cfg.rollout_timeout_s, model=ctx.name)  # the watcher reads the registry now
    deadline = time.monotonic() + ctx.cfg.rollout_timeout_s
    while True:
        applied = traffic(ctx.app, ctx.name)["applied_weights"]
        if applied and all(w == weight for w in applied.values()):
            return
        if time.monotonic() > deadline:
            raise MlrayError(f"the app {ctx.app!r} did not apply challenger weight {weight} within "
                             f"{ctx.cfg.rollout_timeout_s:.0f} s: its replicas apply {applied}")
        time.sleep(0.2)


def _log(ctx: Context, decision: CanaryDecision) -> None:
    figures = decision.figures
    challenger, champion = figures["challenger"], figures["champion"]
    metrics = {"canary.weight": figures["weight"], "canary.challenger_requests": challenger["requests"],
               "canary.challenger_error_rate": challenger["error_rate"],
               "canary.champion_requests": champion["requests"], "canary.champion_error_rate": champion["error_rate"]}
    for side, values in (("challenger", challenger), ("champion", champion)):
        if values["p99_s"] is not None:
            metrics[f"canary.{side}_p99_s"] = values["p99_s"]
    ctx.record.decision(f"{decision.action}: {decision.reason}", metrics)
    ctx.say(f"watch: {decision.action.upper()}: {decision.reason}")


def watch(ctx: Context) -> StepResult:
    """Each weight of ``canary.weights`` in turn, held until :class:`CanaryPolicy` advances or rolls back.

    Each finished weight is recorded as it finishes (``progress``): a resumed run starts at the next one.
    """
    from mlray.serving.deploy import traffic

    deployed = ctx.out("deploy")
    if not deployed.get("loaded"):
        return StepResult({"decision": "rollback", "reason": deployed.get("reason", "not deployed")},
                          status="skipped")
    canary, policy = ctx.cfg.canary, CanaryPolicy(ctx.cfg.canary)
    version, champion_version = int(deployed["version"]), int(deployed["champion_version"])
    done: list[dict[str, Any]] = list(ctx.out("watch").get("stages", []))
    for weight in canary.weights[len(done):]:
        _apply_weight(ctx, weight)
        before, started, last_said = traffic(ctx.app, ctx.name)["counts"], time.monotonic(), 0.0
        while True:
            time.sleep(canary.poll_s)
            after = traffic(ctx.app, ctx.name)["counts"]
            held = time.monotonic() - started
            decision = policy.decide(weight=weight, champion=window(before, after, f"champion:v{champion_version}"),
                                     challenger=window(before, after, f"challenger:v{version}"), held_s=held)
            if decision.action == "hold":
                if held - last_said >= 10:
                    ctx.say(f"watch: {decision.reason}")
                    last_said = held
                continue
            _log(ctx, decision)
            if decision.action == "rollback":
                return StepResult({"decision": "rollback", "reason": decision.reason, "stages": done,
                                   "failed_stage": decision.figures})
            done.append(decision.figures)
            ctx.record.progress("watch", {"stages": done})
            break
    return StepResult({"decision": "promote", "stages": done,
                       "reason": f"challenger stayed within bounds at weights {list(canary.weights)}"})


def _clear_challenger(ctx: Context) -> None:
    """No traffic to the challenger first, then no challenger: never a request to a version being dropped."""
    from mlray.serving.deploy import rollout

    registry.set_challenger_weight(ctx.name, 0.0)
    rollout(ctx.app, timeout_s=ctx.cfg.rollout_timeout_s, model=ctx.name)
    try:
        tracking.client().delete_registered_model_alias(ctx.name, ctx.cfg.canary.alias)
    except Exception:  # noqa: BLE001 - already gone (a resumed run)
        pass
    registry.set_challenger_weight(ctx.name, None)
    rollout(ctx.app, timeout_s=ctx.cfg.rollout_timeout_s, model=ctx.name)


def finish(ctx: Context) -> StepResult:
    """Promote the challenger to champion (through the gate again: the champion may have moved meanwhile)
    or roll it back. Both are idempotent, so a resumed run can finish a half-done one."""
    watched = ctx.out("watch")
    version = int(ctx.out("compress")["served_version"])
    decision, reason = watched.get("decision", "rollback"), str(watched.get("reason", ""))
    if decision == "promote":
        try:
            result = registry.promote(ctx.name, version=version, alias="champion", gate=ctx.gate,
                                      reason=f"pipeline {ctx.pipeline_id}: {reason}")
        except PromotionRefused as err:
            decision, reason = "rollback", f"the gate refused at promotion time: {err}"
        else:
            from mlray.serving.deploy import rollout

            # the app answers with the new champion now
            rollout(ctx.app, timeout_s=ctx.cfg.rollout_timeout_s, model=ctx.name)
            _clear_challenger(ctx)
            ctx.say(f"finish: {ctx.name}@champion -> version {version} (was {result.previous_version})")
            return StepResult({"outcome": "champion", "version": version, "previous": result.previous_version},
                              stop=("champion", reason))
    _clear_challenger(ctx)
    tracking.client().set_model_version_tag(ctx.name, str(version), "mlray.pipeline.rolled_back", reason[:5000])
    ctx.say(f"finish: rolled back version {version}: {reason}")
    return StepResult({"outcome": "rolled_back", "version": version, "reason": reason}, stop=("rolled_back", reason))
