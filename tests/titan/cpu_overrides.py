"""``--override.imports cpu_overrides.cpu_sdpa``: causal SDPA instead of FlexAttention (no CPU backward).

Fine for the tests' batches: one document per row, so causal attention is what the block mask gives.
"""

from torchtitan.config.override import override
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention


@override(target=FlexAttention.Config, description="tests: SDPA on CPU")
def cpu_sdpa(cfg: FlexAttention.Config) -> ScaledDotProductAttention.Config:
    return ScaledDotProductAttention.Config()
