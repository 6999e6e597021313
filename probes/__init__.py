"""musicrfm probes: audio -> direction banks, and nothing else. Rendered music-theory audio -> per-layer
MusicGen features -> probes -> a direction bank the engine loads. ("render" here always means MIDI
synthesis with a soundfont; the engine *generates* audio.)

  syntheory       the SynTheory concepts rendered from MIDI (`MidiScore`) with a General MIDI soundfont
  dataset         reading a rendered (or original) SynTheory folder: info.csv, clips, labels
  extract         audio -> EnCodec codes -> decoder features at the engine's injection point
  rfm             Recursive Feature Machine probes (Laplace kernel, AGOP) and their directions
  baselines       linear probe (MSE) and difference of means, exported the same way
  train           per-layer probes -> DirectionBank
  classification  `musicrfm report`: the paper's Table 1, how well each concept can be read off the
                  training features (held-out probe accuracy / R^2); judges probes, not steered audio
                  (that is evaluation/)
"""
