"""The one layer loop every stage shares: a source materialises decoder layer i, the stages run on it
(statistics, factorization, evaluation, writers), it is freed, and only activations move on."""
