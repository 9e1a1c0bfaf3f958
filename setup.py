"""ftjax: fine-tune pretrained encoders in JAX/Flax."""

import setuptools

setuptools.setup(
    name="ftjax",
    version="0.1.0",
    description="Fine-tuning pretrained text, image and speech models (BERT, MiniLM, ViT, ResNet, "
                "EfficientNet-Lite, Whisper) and decoder LMs (Llama, GPT-2) with JAX, Flax and Optax.",
    packages=setuptools.find_packages(include=["ftjax", "ftjax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml-collections>=1.1,<2",
        "absl-py>=2.1,<3",
        "tensorflow-datasets>=4.9.10,<4.10",
        "importlib_resources>=6",  # tfds 4.9.10 imports it without declaring it
        "array_record>=0.8,<0.9",
        "grain>=0.2.18,<0.3",
        "transformers>=5.24,<6",  # 5.24: its torch-free GGUF tokenizer converter
        "tokenizers>=0.22,<0.24",
        "huggingface_hub>=1.0,<2",
        "safetensors>=0.6,<0.9",
        "onnx>=1.17,<2",  # reads ONNX encoder exports' initializers (no onnxruntime, no torch)
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "etils[epath]>=1.10",
        "numpy>=2,<3",
        "pillow>=10",  # image decoding and resizing
        "sentencepiece>=0.2,<0.3",  # converts SentencePiece models (DeBERTa-v3 spm.model) to fast tokenizers
        "protobuf>=4",  # read by that conversion
        "soundfile>=0.12,<0.15",  # audio decoding (libsndfile: WAV, FLAC, OGG, MP3)
        "soxr>=0.5,<2",  # resampling to 16 kHz
        "jiwer>=3,<5",  # word and character error rates
        "gguf>=0.19,<1",  # GGUF weights (llama.cpp's format): header, tensor types, dequantization
        "jinja2>=3.1,<4",  # chat templates (transformers' apply_chat_template)
        "rouge-score>=0.1.2,<0.2",  # ROUGE-1/2/L of generated text
        "matplotlib>=3.8,<4",  # ftjax.report's plots
        "pyyaml>=6,<7",  # ftjax.report's paper-number files
    ],
    # pytest-xdist: pytest.ini runs the suite in 2 worker processes (-n 0: in-process);
    # scikit-image: the sample photos of the EfficientNet-Lite0 top-1 test; hypothesis: the reader fuzz tests
    extras_require={"test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "scikit-image>=0.24",
                              "hypothesis>=6.100,<7"]},
)
