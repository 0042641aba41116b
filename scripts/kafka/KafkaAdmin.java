// Small admin client used by scripts/kafka.sh, run with `java -cp 'libs/*' KafkaAdmin.java`.
//   ready BOOTSTRAP TIMEOUT_S          exit 0 once the broker answers a metadata request
//   create-topic BOOTSTRAP NAME PARTS  create a topic unless it exists
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.common.errors.TopicExistsException;

public class KafkaAdmin {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[1]);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "5000");
        try (Admin admin = Admin.create(props)) {
            switch (args[0]) {
                case "ready" -> ready(admin, Long.parseLong(args[2]));
                case "create-topic" -> createTopic(admin, args[2], Integer.parseInt(args[3]));
                default -> throw new IllegalArgumentException("unknown command " + args[0]);
            }
        }
    }

    static void ready(Admin admin, long timeoutSeconds) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(timeoutSeconds);
        while (true) {
            try {
                // describeCluster is answered from a Metadata request: the broker is serving.
                int nodes = admin.describeCluster().nodes().get(5, TimeUnit.SECONDS).size();
                System.out.println("kafka: metadata answered, " + nodes + " broker(s)");
                return;
            } catch (Exception e) {
                if (System.nanoTime() > deadline) {
                    System.err.println("kafka: no metadata answer within " + timeoutSeconds + "s: " + e);
                    System.exit(1);
                }
                Thread.sleep(500);
            }
        }
    }

    static void createTopic(Admin admin, String name, int partitions) throws Exception {
        try {
            admin.createTopics(List.of(new NewTopic(name, partitions, (short) 1))).all().get();
            System.out.println("kafka: created topic " + name);
        } catch (ExecutionException e) {
            if (!(e.getCause() instanceof TopicExistsException)) throw e;
            System.out.println("kafka: topic " + name + " exists");
        }
    }
}
