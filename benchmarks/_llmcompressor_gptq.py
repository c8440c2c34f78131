"""llm-compressor's GPTQ on a save_pretrained causal LM and given calibration token windows; run by
benchmarks/gptq_peer.py with the peer's own interpreter (llm-compressor pins its own torch/transformers).

    python _llmcompressor_gptq.py MODEL_DIR IDS.pt OUT_DIR --bits 3 --group 64 [--damp 0.01 --block 128]

Weights asymmetric, per group (or per channel with --group 0), activation ordering off, lm_head left out:
the settings of our `gptq` arm. Writes the compressed-tensors folder OUT_DIR.
"""
import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("ids", help="a torch file holding an int64 tensor [windows, tokens]")
    p.add_argument("out")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group", type=int, default=0, help="0 = one scale per output channel")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--block", type=int, default=128)
    a = p.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = torch.load(a.ids)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=False,
                               strategy="group" if a.group else "channel", group_size=a.group or None)
    modifier = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            ignore=["lm_head"], actorder=None, dampening_frac=a.damp, block_size=a.block)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=len(ids), max_seq_length=ids.shape[1])
    model.save_pretrained(a.out, save_compressed=True)


if __name__ == "__main__":
    main()
