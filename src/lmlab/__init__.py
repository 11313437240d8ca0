"""lmlab: build, train, evaluate and honestly compare small language models."""
