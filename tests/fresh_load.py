"""Loads a saved adapter in a fresh Python process and writes the model outputs: the conformance suite's reload check.

usage: python fresh_load.py ROUTE BASE_DIR ADAPTER_DIR INPUTS_FILE OUTPUT_FILE CASE_ID
ROUTE: peft (PeftModel.from_pretrained) | auto (AutoPeftModel* from the adapter dir alone) |
       transformers (base.load_adapter(dir)) | transformers-auto (ModelClass.from_pretrained(adapter_dir))
"""

import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

import peft_effadapt  # noqa: F401  (registers the PEFT types: a user must import it before loading)


def main(route, base_dir, adapter_dir, inputs_file, output_file, case_id):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from method_cases import CASES

    case = next(c for c in CASES if c.id == case_id)
    torch.set_num_threads(1)
    config = transformers.AutoConfig.from_pretrained(base_dir)
    model_cls = getattr(transformers, config.architectures[0])
    if route == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model_cls.from_pretrained(base_dir), adapter_dir)
    elif route == "auto":
        import peft

        model = getattr(peft, case.auto_class).from_pretrained(adapter_dir)
    elif route == "transformers":
        model = model_cls.from_pretrained(base_dir)
        model.load_adapter(adapter_dir)
    elif route == "transformers-auto":
        model = model_cls.from_pretrained(adapter_dir)
    else:
        raise SystemExit(f"unknown route {route}")
    model.eval()
    with torch.no_grad():
        out = case.output(model(**load_file(inputs_file)))
    save_file({"out": out.contiguous(), "type_ok": torch.tensor(int("PeftModel" in type(model).__name__))}, output_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
