"""musicgen-mini: a small MusicGen trained here, on SynTheory audio, so steering can be proven offline.

  corpus.py   render the training corpus (notes, chords, intervals; captions without pitch)
  codec.py    train an EnCodec-architecture codec (our own residual-VQ training)
  lm.py       train the text encoder + MusicGen decoder on the codec's tokens; assemble the model
  cli.py      `musicrfm mini corpus | codec | lm | export | check`

The trained model ships in engine/weights/musicgen-mini; `musicrfm.engine.model.load_model("musicgen-mini")`
loads it. docs/musicgen-mini.md holds the recipe and what each stage measured.
"""
