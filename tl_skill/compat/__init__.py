"""Every TransformerLens-version and bridge-internal detail lives in this package.

The rest of tl_skill talks to `HookedRootModule` hook points by name and to the helpers re-exported
here (`compat.<name>` is the one way in); it never asks which TransformerLens it runs on.

- `core`: model classes (TransformerLens 4.x `TransformerBridge`, 3.9 `HookedTransformer`), hook
  names, weights read directly (W_out, W_O, the final norm, the unembedding), bridge internals;
- `kv_cache`: continuing a causal prefix from its keys/values (Hugging Face or TransformerLens caches);
- `plain`: plain Hugging Face models from a bridge (copies, and the shared-tensor view for passes
  nobody listens to).
"""

from tl_skill.compat.core import (
    attention_projections, attn_out_vectors, ATTN_PROJECTIONS, block_norms, build_bridge,
    build_hooked_transformer, build_model, check_hook_width, check_kind, check_neuron_axis, context_length,
    DEFAULT_KIND, EMBED_HOOK, embed_hook, embed_tokens, final_logit_softcap, final_norm, forward, gated_mlp,
    HAS_BRIDGE, HAS_HOOKED_TRANSFORMER, hf_model_of, hf_module, hf_param_name, hook_names, HOOKED_EMBED_HOOK,
    HookedRootModule, is_bridge, is_masked_lm, label_logits, mixture_of_experts, mlp_out_vectors,
    mlp_post_hook, MLP_PROJECTIONS, mlp_projections, model_device, model_dtype, MODEL_KINDS, model_norms,
    model_prefix_ids, named_hf_parameters, PREFIX_ATTR, special_prefix, StopForward, TL_MAJOR, TL_VERSION,
    UNEMBED_IN_HOOK, unembedding, WRAPPER,
)
from tl_skill.compat.kv_cache import (
    copy_kv_cache, final_resid_hook, forward_with_cache, has_forward_hooks, last_kv_hook, merge_kv_caches,
    new_kv_cache, pad_token_id, prefix_cache_supported,
)
from tl_skill.compat.plain import (
    base_forward, PACK_TOKENS, PLAIN_FAMILIES, plain_hf_copy, plain_input_cache, plain_prompt_logits,
    plain_view, unwrapped,
)
