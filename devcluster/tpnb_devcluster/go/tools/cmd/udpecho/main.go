// Command udpecho answers every UDP datagram with "echo: " + its payload, so
// tests can check UDP forwarding through services and intercepts.
package main

import (
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	addr := ":9999"
	if p := os.Getenv("UDP_PORT"); p != "" {
		addr = ":" + p
	}
	conn, err := net.ListenPacket("udp", addr)
	if err != nil {
		log.Fatalf("udpecho: %v", err)
	}
	log.SetOutput(os.Stdout)
	log.Printf("udpecho: listening on %s", conn.LocalAddr())
	go func() {
		// Exit cleanly on SIGTERM/SIGINT so a pod stops without a kill timeout.
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		<-sigs
		os.Exit(0)
	}()
	buf := make([]byte, 65535)
	for {
		n, peer, err := conn.ReadFrom(buf)
		if err != nil {
			log.Printf("udpecho: read: %v", err)
			continue
		}
		reply := append([]byte("echo: "), buf[:n]...)
		if _, err := conn.WriteTo(reply, peer); err != nil {
			log.Printf("udpecho: write to %s: %v", peer, err)
		}
	}
}
