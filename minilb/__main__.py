from minilb.cli import main

main()
