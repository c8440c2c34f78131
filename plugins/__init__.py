"""Built-in method plugins, one sub-package each, imported lazily by name.

``BUILTIN`` maps a plugin name to ``("module:Class", one-line description)``; the registry imports
the module only when the plugin is used, so listing stays fast.
"""

BUILTIN: dict[str, tuple[str, str]] = {
    "lora": ("blocktrain.plugins.lora.plugin:LoraPlugin", "LoRA adapters on chosen Linear layers of any transformers/timm model"),
    "blocklora": ("blocktrain.plugins.blocklora.plugin:BlockLoraPlugin",
                  "Block-LoRA (One Head Eight Arms): LoRA with one down-projection shared by n input blocks"),
    "magnitude": ("blocktrain.plugins.sparsity.plugin:MagnitudePlugin",
                  "Magnitude pruning (unstructured or N:M) of every Linear; the data-free baseline"),
    "wanda": ("blocktrain.plugins.sparsity.plugin:WandaPlugin",
              "Wanda pruning (|W|·‖X‖, unstructured or N:M) of every Linear; iCBS's starting mask"),
    "sparsegpt": ("blocktrain.plugins.sparsity.plugin:SparseGPTPlugin",
                  "SparseGPT one-shot pruning with OBS weight updates (unstructured or N:M) of every Linear"),
    "icbs": ("blocktrain.plugins.icbs.plugin:ICBSPlugin",
             "iCBS pruning: Wanda init, then block coordinate descent over QUBOs (long, resumable calibrate)"),
    "lpvit": ("blocktrain.plugins.lpvit.plugin:LPViTPlugin",
              "LPViT block pruning: power-aware equal-slope allocation to a FLOPs budget, masks fixed for fine-tuning"),
    "rtn": ("blocktrain.plugins.quantization.plugin:RTNPlugin",
            "Round-to-nearest weight quantization (per channel or group; W/A bits) of every Linear"),
    "gptq": ("blocktrain.plugins.quantization.plugin:GPTQPlugin",
             "GPTQ weight quantization (Hessian error feedback; act-order, groups) of every Linear"),
    "cbq": ("blocktrain.plugins.cbq.plugin:CBQPlugin",
            "CBQ quantization: CFP, sliding-window cross-block reconstruction, LoRA-Rounding (W4A16 default)"),
    "flow_matching": ("blocktrain.plugins.bfm.plugin:FlowMatchingPlugin",
                      "Flow matching (SiT-style linear path, one velocity network) with ODE/SDE samplers and FD evaluation"),
    "bfm": ("blocktrain.plugins.bfm.plugin:BFMPlugin",
            "Blockwise Flow Matching: per-segment velocity stacks, a trunk aligned to a frozen encoder, the FRN"),
}
BUILTIN["h4g"] = ("blocktrain.plugins.h4g.plugin:H4GPlugin",
                  "H4G: zero-shot node classification on text-attributed graphs in the Poincaré ball, Möbius block scaling")
BUILTIN["block_diffusion"] = ("blocktrain.plugins.block_diffusion.plugin:BlockDiffusionPlugin",
                              "Block diffusion LM (BD3-LM; SDAR/SDAR-VL/NBDiff switches): two-stream masks, NELBO, KV-cached sampler")
