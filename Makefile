# Shortcuts for the two commands of the README.
.PHONY: demo demo-down test

demo:
	scripts/demo

demo-down:
	scripts/demo down

test:
	scripts/test
