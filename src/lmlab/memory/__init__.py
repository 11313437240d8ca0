"""Memories a trained model reads at inference: a kNN-LM datastore on disk over FAISS
(``store``, ``knn``) and the Hopfield recall probe (``hopfield``)."""
