"""The two files of a saved adapter directory (the PEFT convention), named in one place."""

#: The adapter configuration (methods, options, host description), JSON.
CONFIG_NAME = "adapter_config.json"
#: The adapter tensors, safetensors.
WEIGHTS_NAME = "adapter_model.safetensors"
