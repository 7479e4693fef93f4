from zeroest.cli import main

main()
