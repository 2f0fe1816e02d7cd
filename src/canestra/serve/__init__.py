"""Online prediction: the in-process predictor, the HTTP app, the web page."""
