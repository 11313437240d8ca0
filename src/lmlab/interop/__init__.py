"""Interoperability with the tools the field uses: Hugging Face ``transformers`` export and
import (``hf.py``, ``llama.py``, ``hf_model.py``, ``tokenizer.py``) and the
lm-evaluation-harness (``harness.py``)."""
