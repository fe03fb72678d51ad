"""The generation engine: prefill, the generic decoder and the shared-prefix Mllama decoder, the device vote,
and the one `DecodeOptions` that chooses among them."""
