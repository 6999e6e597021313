"""musicrfm probes: audio -> direction banks, and nothing else. Rendered music-theory audio -> per-layer
MusicGen features -> probes -> a direction bank the engine loads.

  syntheory  the SynTheory concepts rendered from MIDI with a General MIDI soundfont
  extract    audio -> EnCodec codes -> decoder features at the engine's injection point
  rfm        Recursive Feature Machine probes (Laplace kernel, AGOP) and their directions
  baselines  linear probe (MSE) and difference of means, exported the same way
  train      per-layer probes -> DirectionBank
"""
