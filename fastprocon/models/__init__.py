"""Models: specs (specs.py), the meta-device build and sharded load (loading.py, load.py), decoder
layers and sizes (layers.py), and the weights' fingerprint (fingerprint.py)."""
from fastprocon.models.fingerprint import model_fingerprint
from fastprocon.models.layers import decoder_layers, hidden_size, num_layers, unwrap_model
from fastprocon.models.load import DTYPES, LoadedModel, load_model, resolve_device
from fastprocon.models.specs import tiny_tokenizer

__all__ = ["LoadedModel", "load_model", "resolve_device", "DTYPES", "decoder_layers", "hidden_size", "num_layers",
           "unwrap_model", "model_fingerprint", "tiny_tokenizer"]
