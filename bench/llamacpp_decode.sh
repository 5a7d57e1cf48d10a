#!/usr/bin/env bash
# llama.cpp's decoding speed on the CPU for a Hugging Face model, the end-to-end reference
# for lowbit's: builds llama.cpp (from the llama-cpp-python sdist on PyPI, as the
# ggml-coldbench anchor does), converts the model to GGUF (f16, bf16), quantizes it
# (Q4_K_M, Q3_K_S, Q2_K) and runs llama-bench on each file: decode only, batch 1.
#
#   bench/llamacpp_decode.sh MODEL_DIR [WORK_DIR]
#   THREADS=2 TOKENS=64 bench/llamacpp_decode.sh ~/.cache/lowbit/models/SmolLM2-135M-Instruct /tmp/llamacpp
#
# MODEL_DIR: a directory with config.json, the tokenizer and *.safetensors. WORK_DIR (default
# ./llamacpp-work) receives the source, the build, a venv for the converter and the GGUF
# files; steps whose outputs exist are skipped, so a rerun only benchmarks. The results go
# to WORK_DIR/decode-THREADS-threads.md. Settings (environment): THREADS (2), TOKENS (64),
# REPETITIONS (5), TYPES ("Q4_K_M Q3_K_S Q2_K"), LLAMA_CPP_PYTHON (0.3.36), PYTHON (python3,
# with torch, transformers, numpy and safetensors: the converter's imports; sentencepiece
# is added in the venv), COLDBENCH_SRC (coldbench.cpp: also builds WORK_DIR/coldbench).
# AVX-512 is used where /proc/cpuinfo lists it; AMX stays off, as in the anchor.
set -euo pipefail

MODEL_DIR=$(realpath "${1:?usage: $0 MODEL_DIR [WORK_DIR]}")
WORK_DIR=$(realpath -m "${2:-llamacpp-work}")
THREADS=${THREADS:-2}
TOKENS=${TOKENS:-64}
REPETITIONS=${REPETITIONS:-5}
TYPES=${TYPES:-Q4_K_M Q3_K_S Q2_K}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}

mkdir -p "$WORK_DIR"
cd "$WORK_DIR"
SRC=$WORK_DIR/llama.cpp
BUILD=$SRC/build
NAME=$(basename "$MODEL_DIR" | tr '[:upper:]' '[:lower:]')

# 1. The source.
if [ ! -d "$SRC" ]; then
  "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d dl
  tar xzf "dl/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
  cp -a "llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp" "$SRC"
fi

# 2. The build: ggml's CPU backend, llama-quantize and llama-bench (and coldbench).
has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
if [ ! -x "$BUILD/bin/llama-bench" ] || [ ! -x "$BUILD/bin/llama-quantize" ]; then
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" \
    -DGGML_AVX512_BF16="$(has avx512_bf16)" \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DGGML_LLAMAFILE=ON -DGGML_CUDA=OFF -DGGML_OPENMP=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
  cmake --build "$BUILD" -j"$JOBS" --target llama-quantize llama-bench
fi
if [ -n "${COLDBENCH_SRC:-}" ] && [ ! -x coldbench ]; then
  g++ -O2 -std=c++17 -I"$SRC/ggml/include" "$COLDBENCH_SRC" -o coldbench \
    "$BUILD/ggml/src/libggml.a" "$BUILD/ggml/src/libggml-cpu.a" "$BUILD/ggml/src/libggml-base.a" \
    -fopenmp -lpthread -ldl
fi

# 3. GGUF files: f16 and bf16 from the checkpoint, the k-quants from f16.
if [ ! -x venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages venv
  venv/bin/python -m pip install --quiet "sentencepiece>=0.1.98,<0.3.0"
fi
mkdir -p models
for outtype in f16 bf16; do
  out=models/$NAME-$outtype.gguf
  [ -f "$out" ] || PYTHONPATH="$SRC/gguf-py" venv/bin/python "$SRC/convert_hf_to_gguf.py" "$MODEL_DIR" \
    --outtype "$outtype" --outfile "$out"
done
models=(models/"$NAME"-f16.gguf models/"$NAME"-bf16.gguf)
for type in $TYPES; do
  out=models/$NAME-$type.gguf
  [ -f "$out" ] || "$BUILD/bin/llama-quantize" models/"$NAME"-f16.gguf "$out" "$type" > "$out.log" 2>&1
  models+=("$out")
done

# 4. Decoding speed: TOKENS tokens after an empty prompt, batch 1, THREADS threads.
args=(-t "$THREADS" -p 0 -n "$TOKENS" -r "$REPETITIONS" -o md)
for m in "${models[@]}"; do args+=(-m "$m"); done
echo "$BUILD/bin/llama-bench ${args[*]}"
"$BUILD/bin/llama-bench" "${args[@]}" | tee "decode-$THREADS-threads.md"
