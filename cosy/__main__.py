from cosy.cli.quick import main

main()
