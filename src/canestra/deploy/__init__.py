"""Cloud deployment: AWS EMR + S3 in an EU region."""
