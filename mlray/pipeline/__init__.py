"""One gated pipeline from training to champion: train, evaluate, gate, register, (compress), deploy as
challenger, watch a canary, promote or roll back. See docs/pipeline.md."""

from mlray.pipeline.config import PipelineConfig, load_pipeline, parse_pipeline
from mlray.pipeline.runner import PipelineResult, plan, run

__all__ = ["PipelineConfig", "PipelineResult", "load_pipeline", "parse_pipeline", "plan", "run"]
