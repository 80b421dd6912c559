"""One module per dvc.yaml stage, named as the stage: load inputs, call library functions, write
outputs. A stage never imports another stage; the table in desensitize.orchestration.pipeline lists them."""
