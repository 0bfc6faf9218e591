"""Loads a saved adapter in a fresh Python process and writes the model outputs: the conformance suite's reload check.

usage: python fresh_load.py ROUTES BASE_DIR ADAPTER_DIR INPUTS_FILE OUTPUT_FILE CASE_ID
ROUTES: comma-separated, each loads its own model from disk in this process:
        peft (PeftModel.from_pretrained) | auto (AutoPeftModel* from the adapter dir alone) |
        transformers (base.load_adapter(dir)) | transformers-auto (ModelClass.from_pretrained(adapter_dir))
The output file holds `out_<route>` and `type_ok_<route>` per route (one interpreter start for all routes: starting
Python with torch and transformers costs more than the loads themselves).
"""

import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

import peft_effadapt  # noqa: F401  (registers the PEFT types: a user must import it before loading)


def load(route, case, base_dir, adapter_dir):
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
    return model.eval()


def main(routes, base_dir, adapter_dir, inputs_file, output_file, case_id):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from method_cases import CASES

    case = next(c for c in CASES if c.id == case_id)
    torch.set_num_threads(1)
    results = {}
    for route in routes.split(","):
        model = load(route, case, base_dir, adapter_dir)
        with torch.no_grad():
            results[f"out_{route}"] = case.output(model(**load_file(inputs_file))).contiguous()
        results[f"type_ok_{route}"] = torch.tensor(int("PeftModel" in type(model).__name__))
    save_file(results, output_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
