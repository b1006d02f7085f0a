"""The tokenizer at speed gives the same token ids: argmax on the half-precision logits (no fp32 copy),
convolution weights kept in that precision (no autocast cast per call), channels-last."""
import copy

import pytest
import torch

from beit_fast.utils.amp import autocast_or_null
from beit_fast.tokenizer.dalle import DalleEncoder
from beit_fast.tokenizer.dvae import DiscreteVAE, DVAEConfig
from beit_fast.tokenizer.base import tokenize

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizers():
    torch.manual_seed(0)
    return {"dvae": DiscreteVAE(DVAEConfig.preset("tiny", vocab_size=64, input_size=32)).eval(),
            "dalle": DalleEncoder(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=64, input_size=16).eval()}


def _before(tokenizer, images, dtype):
    """The ids as the tokenizer path computed them before: fp32 weights cast by autocast on every call, the
    argmax taken on an fp32 copy of the logits."""
    x = tokenizer._prepare_images(images).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast_or_null("cpu", dtype):
        logits = tokenizer.encode_logits(x)
    return logits.float().argmax(dim=1).flatten(1)


@pytest.mark.parametrize("name", ["dvae", "dalle"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_ids_equal_the_previous_path(name, dtype):
    tokenizer = _tokenizers()[name]
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    reference = _before(copy.deepcopy(tokenizer), images, dtype)
    tokenizer.keep_weights_in(dtype)
    convs = [m for m in tokenizer.modules() if isinstance(m, torch.nn.Conv2d) or hasattr(m, "autocast_lower_precision")]
    assert convs and all(p.dtype == dtype for m in convs for p in m.parameters())
    ids = tokenize(tokenizer, images, dtype)
    assert ids.dtype == torch.int64 and torch.equal(ids, reference)
    # the fp32 reference still agrees on most positions (what --tokenizer_precision auto checks)
    fp32 = _tokenizers()[name].get_codebook_indices(images)
    assert (ids == fp32).float().mean() > 0.5


def test_half_logits_argmax_keeps_ties_and_order():
    logits = torch.tensor([[[[1.0]], [[3.0]], [[3.0]], [[-2.0]]]], dtype=torch.bfloat16)  # a tie at 1 and 2
    assert logits.argmax(dim=1).item() == logits.float().argmax(dim=1).item() == 1
