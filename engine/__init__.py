"""musicrfm engine: the model, the decode loop, steering, direction banks and audio decoding.

Modules, in the order data flows through them:
  model     load MusicGen (Hugging Face id, local directory, random-weight configs)
  bank      DirectionBank / Direction: per-layer concept directions, safetensors + JSON metadata
  steering  Schedule, LayerWeighting, gate, SteeringSpec -> SteeringPlan: (control, step) -> vectors
  decoder   MusicGen's decoder forward pass with a static KV cache and the injection points
  sampling  guidance, temperature / top-k / top-p
  loop      Generator: the one decode loop (chunks, pause between steps, endless re-prompting); Engine: many
            streams stepped in one batched forward
  graphs    the batched step captured once per batch size and replayed (TorchScript trace on a CPU, CUDA graphs)
  audio     streaming EnCodec decode, exact or windowed (WAV files: protocol.wav)
  generation  offline generation with a sidecar that regenerates the same tokens
  cli       `musicrfm generate`, and the model flags every command shares
"""
