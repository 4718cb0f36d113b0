"""Publish MoE checkpoints to the Hugging Face Hub and pull them back.

Public API::

    from hub_scripts.push import push_folder        # (folder, repo_id, private=..., branch=...) -> PushResult
    from hub_scripts.pull import pull, fetch_metadata
    from hub_scripts.card import build_model_card   # -> huggingface_hub.ModelCard
    from hub_scripts.api import make_api            # one HfApi from HF_ENDPOINT and the usual token lookup

CLI: `moe-patch push`, `moe-patch pull` (moe_patch/cli/hub.py); batch: `moe-patch batch recipes.yaml`
(moe_patch/cli/batch.py, above both hub_scripts and converters).
Errors are `hub_scripts.errors.HubError` subclasses (themselves `moe_patch.errors.MoEPatchError`).
"""
