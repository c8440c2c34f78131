"""The library of CLIP adapter methods (Block-LoRA, CLIP-LoRA): few-shot image data with class-name prompts
(``few_shot``), the zero-shot / few-shot task (``task``), the class names and templates of the benchmark
datasets (``class_names``) and the offline demo's tiny CLIP (``tiny_clip``). ``config`` registers their kinds.
"""
