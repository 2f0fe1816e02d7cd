"""What the model answers: class -> family taxonomy, the 'unknown' rule, the Spark stage that applies it."""
