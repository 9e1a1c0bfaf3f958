"""Data: TFDS builders for local files, the grain input pipeline, tokenization.

Modules (imported where used, so `import ftjax.data` stays light):
  tokenizer     load_tokenizer(folder) -> TextTokenizer (HF fast tokenizer, no padding)
  tfds_sources  config.data -> prepared TFDS array_record sources per split role
  builders/     ftjax's own TFDS builders (rotten_tomatoes, bbc_news, local_text, local_prompts, ...)
  pipeline      TextData: exact-resume train batches, complete eval passes
  images        ImageData; audio, speech: log-mel features and SpeechData
  causal        CausalLMData: prompt -> response batches (prompt masked out of the loss)
"""
