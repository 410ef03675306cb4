"""Every autograd node type that the supported models record (NODES.md: BERT,
GPT-2, LLaMA, plain SDPA; CPU and an H100) has a semiring rule."""

import pytest

from semitriton.rules import RULES

NODES = """
AddBackward0 AddmmBackward0 AliasBackward0 BmmBackward0 CatBackward0 CloneBackward0 ExpandBackward0
GeluBackward0 MeanBackward1 MmBackward0 MulBackward0 MulBackward1 NativeLayerNormBackward0 NegBackward0
PowBackward0 ReshapeAliasBackward0 RsqrtBackward0 SafeSoftmaxBackward0
ScaledDotProductCudnnAttentionBackward0 ScaledDotProductEfficientAttentionBackward0
ScaledDotProductFlashAttentionForCpuBackward0 SelectBackward0 SiluBackward0 SliceBackward0
SoftmaxBackward0 SplitBackward0 SumBackward0 TanhBackward0 ToCopyBackward0 TransposeBackward0
UnsafeViewBackward0 UnsqueezeBackward0 ViewBackward0
""".split()
# recorded by other common code paths (flash on CUDA, composed RMS norms and nn.RMSNorm's fused
# node on CUDA, slicing, gathers; spatial transformers, metric learning and bilinear layers)
ALSO = """
ScaledDotProductFlashAttentionBackward0 AddBackward1 SubBackward0 DivBackward0 MeanBackward0 SumBackward1
EmbeddingBackward0 IndexBackward0 PermuteBackward0 TBackward0 SplitWithSizesBackward0 StackBackward0
LogSoftmaxBackward0 WhereBackward0 MaskedFillBackward0 NativeDropoutBackward0 ReluBackward0
FusedRmsNormBackward0
GridSampler2DBackward0 GridSampler3DBackward0 CudnnGridSamplerBackward0 AffineGridGeneratorBackward0
CdistBackward0 PdistBackward0 TrilinearBackward0
NllLossBackward0 NllLoss2DBackward0 MseLossBackward0 SmoothL1LossBackward0 HuberLossBackward0
BinaryCrossEntropyBackward0 BinaryCrossEntropyWithLogitsBackward0 XlogyBackward0 SgnBackward0 ErfinvBackward0
UnsafeSplitBackward0 UnsafeSplitWithSizesBackward0 DistBackward0 LinalgCrossBackward0 ScatterReduceBackward0
""".split()


@pytest.mark.parametrize("name", NODES + ALSO)
def test_rule_exists(name):
    assert name in RULES, f"no semiring rule for {name}"

