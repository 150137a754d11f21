"""Search: full-text, embeddings, the vector store, hybrid ranking, documents and RAG."""
