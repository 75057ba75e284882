"""The serving engine, in vLLM's vocabulary: sequences, block manager, scheduler, model runner, engines."""
